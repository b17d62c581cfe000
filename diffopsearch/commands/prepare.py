"""``diffopsearch prepare``: build or find the embedded default (toy backbone and toy world)."""
from __future__ import annotations


def run(cfg) -> dict:
    from ..backbone.load import prepare_toy

    backbone, dataset = prepare_toy()
    print(f"backbone: {backbone}")
    print(f"dataset: {dataset}")
    return {"backbone": str(backbone), "dataset": str(dataset)}
