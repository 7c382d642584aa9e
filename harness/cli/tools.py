"""The commands about this machine's own tools: `setup` (llama.cpp), `clean` (what
forgebench left in Ollama), `models` (the local models a spec can start from)."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Annotated

import typer

from harness import toolchain
from harness.backends.ollama import OllamaBackend
from harness.cli.app import app, console, friendly
from harness.sources import listing


@app.command()
@friendly
def setup() -> None:
    """Fetch the llama.cpp source matching the installed runtime and build its tools (once)."""
    path = toolchain.ensure_source(log=lambda m: console.print(m))
    with console.status("building llama-server, llama-bench, llama-perplexity"):
        bin_dir = toolchain.build_tools(log=lambda m: console.print(m))
    console.print(f"llama.cpp: {toolchain.revision()} at {path}; tools in {bin_dir}")


@app.command()
@friendly
def clean(
    match: Annotated[
        str, typer.Option("--match", help="only models whose name matches this glob")
    ] = "forgebench/*",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, remove nothing")] = False,
) -> None:
    """Remove the models forgebench left in Ollama (serve.keep) from the server at OLLAMA_HOST."""
    with OllamaBackend() as ollama:
        names = [n for n in ollama.deployed() if fnmatch(n, match) or fnmatch(n, f"{match}:*")]
        for name in names:
            if not dry_run:
                ollama.delete(name)
            console.print(f"{'would remove' if dry_run else 'removed'} {name}")
    if not names:
        console.print(f"no forgebench models matching {match!r} at {ollama.host}")


@app.command()
@friendly
def models(
    hf: Annotated[
        bool, typer.Option("--hf", help="list the Hugging Face cache and model_dirs instead")
    ] = False,
) -> None:
    """List local Ollama models: GGUF, architecture, size, quant, context, mapped HF base."""
    lines = listing.hf_cache_lines() if hf else listing.model_lines()
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
