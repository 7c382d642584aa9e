"""Each quantization recipe beside the plain level it starts from: the same adapter and
route, the same level, made with an importance matrix or other tensor types, or by
Ollama's create.

Accuracy is compared on the items both were scored on: the recipe's drop against the plain
level with its 95% interval (negative: the recipe answers more right), so "the imatrix
helped" is a claim with a confidence and not two accuracies read side by side. KLD and
top-1 agreement are each cell's own against the F16, on the drift text.
"""

from __future__ import annotations

from harness import quant
from harness.report.comparison import Comparison, Items, both, paired_on, paired_text
from harness.track import Invocation, primary_task

COLUMNS = (
    ("pair", "adapter, recipe"),
    ("accuracy", "accuracy plain / recipe"),
    ("paired", "paired: lost, gained, drop [95% interval]"),
    ("kld", "KLD to F16"),
    ("top1", "top-1 agreement"),
    ("decode", "decode tok/s p50"),
    ("size", "size MB"),
)
NOTE = (
    "Each figure plain level / recipe. Paired: the items both were scored on, those the plain "
    "level got right and the recipe wrong, the reverse, and the recipe's drop from the plain "
    "level with its 95% interval (Newcombe's hybrid score; negative: the recipe did better). "
    "KLD and top-1 agreement: each cell's own against its F16 on the drift text. A recipe "
    "by: ollama was quantized by Ollama's create: it has no KLD (the file stays on the "
    "server) and its size is what Ollama lists."
)


def section(inv: Invocation, items: Items) -> Comparison:
    task = primary_task(inv.rows)
    by = {(r.adapter, r.route, r.quant): r for r in inv.rows}
    rows = []
    for row in inv.rows:
        level = quant.level_of(row.quant)
        plain = by.get((row.adapter, row.route, level))
        if level is None or level == row.quant or plain is None or row.setting:
            continue
        table = paired_on(task, plain, row, items)
        pair = (plain, row)
        rows.append(
            {
                "pair": f"{row.line} {row.quant}",
                "accuracy": both(pair, ".3f", lambda r: r.accuracy(task)),
                "paired": paired_text(table),
                "kld": both(pair, ".4f", "kld_mean"),
                "top1": both(pair, ".3f", "top1_agreement"),
                "decode": both(pair, ".1f", "decode_tps_p50"),
                "size": both(pair, ".1f", "gguf_mb"),
            }
        )
    return Comparison("recipes", "Recipes against their plain level", NOTE, COLUMNS, rows)
