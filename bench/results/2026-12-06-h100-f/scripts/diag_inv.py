"""Which part of the loss moves Llama's tied embedding ratio: one pass vs recompute path, seed 0, eager."""

import importlib
import sys
import time

variant = sys.argv[1]
if variant == "recompute":
    lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
    real = lce._fwd_bwd
    lce._fwd_bwd = lambda *a, one_pass=False, ref=None: real(*a, one_pass=False, ref=None)
from invariant_probe import compare, run_against_truth  # noqa: E402

t = time.time()
curve, names, errors = run_against_truth("llama-3.2-1b", 0, 50, ("eager",))
stats = compare(errors, "eager")
med = stats["median paired"]
top = med.argsort(descending=True)[:6].tolist()
print(
    variant,
    f"{time.time() - t:.0f}s",
    "embed",
    round(med[names.index("model.embed_tokens.weight")].item(), 4),
    [(names[i], round(med[i].item(), 3)) for i in top],
    flush=True,
)
