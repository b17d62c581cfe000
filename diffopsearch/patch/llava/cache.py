"""The KV cache of a reduced prefill: layers after a site cache fewer visual tokens."""
from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicCache


class ReducedCache(DynamicCache):
    """A ``DynamicCache`` whose layers may hold different lengths (layers after a site hold fewer visual
    tokens). It also carries what decoding needs per layer: the key padding mask and key bias of the keys
    that layer cached (shared by the layers between two sites), and the original (unreduced) number of
    tokens seen, from which new tokens' default position ids continue."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.seen_tokens = 0                      # original, unreduced sequence length so far
        self.segment_of_layer: list[int] = []     # layer -> segment id
        self.segment_kpm: list[Tensor] = []       # (B, kv) bool, True = real token
        self.segment_bias: list[Tensor | None] = []  # (B, kv) float32 additive key bias, or None
