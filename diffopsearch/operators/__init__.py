"""The operator space as pure tensor functions: scores.py (importance), reduce.py (the five-knob
operator), tome.py (ToMe bipartite matching).

This package's ``__init__`` holds only the torch-free vocabulary that plan validation needs
(names and grid arithmetic), so checking a plan never imports torch.
"""
from __future__ import annotations

import math

SCORES = ("attn", "cls", "norm", "random", "none")
ANCHORS = ("topk", "grid", "bipartite", "iqr", "dominant")
NEEDS_SCORE = ("topk", "iqr", "dominant")  # anchor rules that rank tokens by a score


def grid_shape(keep: int, rows: int, cols: int) -> tuple[int, int] | None:
    """The (gr, gc) grid with gr * gc = keep, gr <= rows, gc <= cols whose aspect is closest to
    rows / cols (ties: more rows); None if keep has no such factorisation."""
    best = None
    for gr in range(1, rows + 1):
        if keep % gr:
            continue
        gc = keep // gr
        if gc > cols:
            continue
        err = abs(math.log(gr / gc) - math.log(rows / cols))
        if best is None or err < best[0] - 1e-12 or (abs(err - best[0]) <= 1e-12 and gr > best[1][0]):
            best = (err, (gr, gc))
    return None if best is None else best[1]


def max_bipartite_merge(n: int) -> int:
    """ToMe merges at most n // 2 of n tokens in one step."""
    return n // 2


def contextual_count(keep: int) -> int:
    """VisionZip's contextual share of ``keep``: 10 of 64, 20 of 128, 30 of 192 (5/32, rounded)."""
    return int(math.floor(keep * 5 / 32 + 0.5))
