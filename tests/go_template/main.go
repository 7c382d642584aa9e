// Command go_template renders an Ollama model template with Go's own text/template, the way
// Ollama's server does for /api/chat, so tests can compare the Go template forgebench writes
// (harness/backends/ollama.py go_template) with the Jinja rendering byte for byte.
//
// Input on stdin, JSON: {"template": "...", "messages": [{"role": "...", "content": "..."}],
// "think": false, "think_level": "", "is_think_set": false}. Output on stdout: the rendering,
// nothing else. A template Go rejects, or one that does not use .Messages, exits 1 with the
// reason on stderr.
//
// What it copies from Ollama v0.33.0-rc2, template/template.go (github.com/ollama/ollama):
//   - Parse: template.New("").Option("missingkey=zero").Funcs(funcs), with the same FuncMap
//     names (json, currentDate, yesterdayDate, toTypeScriptType; the last always "any" here,
//     since forgebench passes no tools and api.ToolProperty is not in the standard library);
//   - Execute's .Messages branch: collate (consecutive messages of one role joined with
//     "\n\n", tool messages kept apart; System = every system message joined with "\n\n"),
//     then the values map {System, Messages, Tools, Response: "", Think, ThinkLevel,
//     IsThinkSet}, each message a templateMessage {Role, Content, Thinking, Images,
//     ToolCalls, ToolName, ToolCallID}.
//
// The older .System/.Prompt/.Response path (templates without .Messages) is not copied:
// forgebench never writes one.
//
// Standard library only, so it builds offline with Debian's golang-go (1.19).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type input struct {
	Template   string    `json:"template"`
	Messages   []message `json:"messages"`
	Think      bool      `json:"think"`
	ThinkLevel string    `json:"think_level"`
	IsThinkSet bool      `json:"is_think_set"`
}

// templateMessage: the fields Ollama's templates see on each of .Messages.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string { return "any" },
}

// identifiers: Ollama's Identifiers, the field and variable names a template uses.
func identifiers(n parse.Node) []string {
	var names []string
	switch n := n.(type) {
	case *parse.ListNode:
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
	case *parse.TemplateNode:
		if n.Pipe != nil {
			names = identifiers(n.Pipe)
		}
	case *parse.ActionNode:
		names = identifiers(n.Pipe)
	case *parse.IfNode:
		names = branch(&n.BranchNode)
	case *parse.RangeNode:
		names = branch(&n.BranchNode)
	case *parse.WithNode:
		names = branch(&n.BranchNode)
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
	case *parse.FieldNode:
		names = n.Ident
	case *parse.VariableNode:
		names = n.Ident
	}
	return names
}

func branch(n *parse.BranchNode) []string {
	names := identifiers(n.Pipe)
	names = append(names, identifiers(n.List)...)
	if n.ElseList != nil {
		names = append(names, identifiers(n.ElseList)...)
	}
	return names
}

func collate(msgs []message) (string, []*templateMessage) {
	var system []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func run() error {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		return fmt.Errorf("reading the JSON input: %w", err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		return err
	}
	usesMessages := false
	for _, t := range tmpl.Templates() {
		for _, name := range identifiers(t.Root) {
			usesMessages = usesMessages || strings.ToLower(name) == "messages"
		}
	}
	if !usesMessages {
		return fmt.Errorf("the template does not use .Messages; only that path is rendered here")
	}
	for i := range in.Messages { // api.Message's UnmarshalJSON lowercases the role
		in.Messages[i].Role = strings.ToLower(in.Messages[i].Role)
	}
	system, messages := collate(in.Messages)
	return tmpl.Execute(os.Stdout, map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      []any(nil),
		"Response":   "",
		"Think":      in.Think,
		"ThinkLevel": in.ThinkLevel,
		"IsThinkSet": in.IsThinkSet,
	})
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
