"""What the chain reads besides the model: training examples, evaluation tasks and replay
prompts. Training data (`training`) is chat conversations; evaluation tasks (`evals`) are
lm-eval task files under evals/; replay prompts (`replay`) are what an adapter rehearses."""

from harness.data.training import arithmetic, held_out, lines, read_jsonl, training_set

__all__ = ["arithmetic", "held_out", "lines", "read_jsonl", "training_set"]
