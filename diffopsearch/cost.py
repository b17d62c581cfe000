"""Analytic LLM prefill FLOPs (docs/DESIGN.md section 4), from the text config alone (works on the meta
device, no weights).

Counting convention: 2 FLOPs per multiply-add, matmuls only (as ``torch.utils.flop_counter``
counts). Per decoder layer with n tokens, d = hidden, m = intermediate, H / Hkv heads of size dh:

- projections: q and o ``2 n d (H dh)`` each, k and v ``2 n d (Hkv dh)`` each (GQA);
- gated MLP: three matmuls, ``3 * 2 n d m``;
- attention: scores and AV ``2 * pairs * (H dh)`` each, pairs = n (n + 1) / 2 with causal
  halving (the default) or n^2 (``causal=False``: what FlopCounterMode reports, since it does not
  discount the causal mask).

Norms, RoPE, softmax, embeddings and the LM head are not counted (the LM head is the same for
every plan at generation time: one position). A site adds its own overhead
(:func:`site_overhead_flops`): the ``attn`` score (one q projection of the last token and its dot
products with every key it sees), the similarity matmul (cosine of dropped tokens' keys against
the anchors', or ToMe's A x B) and the dense merge matmul. Everything is arithmetic, so the token
counts may be floats or tensors (the search's expected counts).

Cost is per sample; ``flops_ratio`` = plan FLOPs / unreduced FLOPs on the same inputs.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import UserError


def text_config_of(config) -> Any:
    """The decoder config of a LlavaConfig, a model, or a text config itself."""
    config = getattr(config, "config", config)
    return getattr(config, "text_config", None) or config


def dims(text_config) -> dict:
    """d, m, H, Hkv, dh, L of a decoder config (a dict from an earlier ``dims`` passes through)."""
    if isinstance(text_config, dict) and "dh" in text_config:
        return text_config
    tc = text_config_of(text_config)
    d = int(tc.hidden_size)
    H = int(tc.num_attention_heads)
    Hkv = int(getattr(tc, "num_key_value_heads", None) or H)
    dh = int(getattr(tc, "head_dim", None) or d // H)
    return {"d": d, "m": int(tc.intermediate_size), "H": H, "Hkv": Hkv, "dh": dh,
            "L": int(tc.num_hidden_layers)}


def layer_flops(text_config, n_tokens, causal: bool = True):
    """One decoder layer's prefill FLOPs on ``n_tokens`` tokens (int, float or tensor)."""
    g = dims(text_config)
    d, m, qd, kvd = g["d"], g["m"], g["H"] * g["dh"], g["Hkv"] * g["dh"]
    n = n_tokens
    proj = 2 * n * d * (2 * qd + 2 * kvd)
    mlp = 6 * n * d * m
    pairs = n * (n + 1) / 2 if causal else n * n
    return proj + mlp + 4 * pairs * qd


def sequence_flops(text_config, visual_tokens_per_layer: Sequence, n_text, causal: bool = True):
    """Sum of :func:`layer_flops` over layers with ``n_text + v_l`` tokens in layer l (v_l may be
    tensors: the search's expected counts)."""
    total = 0
    for v in visual_tokens_per_layer:
        total = total + layer_flops(text_config, n_text + v, causal)
    return total


def full_flops(text_config, n_visual, n_text, causal: bool = True):
    return dims(text_config)["L"] * layer_flops(text_config, n_text + n_visual, causal)


def attn_score_flops(text_config, n_seq):
    """FastV's score: q projection of the last token plus its dot products with n_seq keys."""
    g = dims(text_config)
    qd = g["H"] * g["dh"]
    return 2 * g["d"] * qd + 2 * qd * n_seq


def merge_flops(text_config, n_in, keep, layer: int, similarity: bool = True):
    """Dense merge of n_in - keep dropped tokens into keep anchors: cosine similarity of keys
    (dk = head_dim after layer 0, hidden size at layer 0 where the hidden states are the keys) and
    the (keep x dropped) @ (dropped x d) flow matmul."""
    g = dims(text_config)
    dk = g["dh"] if layer > 0 else g["d"]
    dropped = n_in - keep
    return 2 * dropped * keep * ((dk if similarity else 0) + g["d"])


def bipartite_flops(text_config, n_in, layer: int):
    """ToMe's A x B cosine similarity (the merge itself is a scatter, no matmul)."""
    g = dims(text_config)
    dk = g["dh"] if layer > 0 else g["d"]
    a = (n_in + 1) // 2 if isinstance(n_in, int) else (n_in + 1) / 2
    b = n_in // 2 if isinstance(n_in, int) else n_in / 2
    return 2 * a * b * dk


def site_overhead_flops(text_config, site, n_in, n_text):
    """The operator's own FLOPs at one site (0 for a no-op site, keep >= n_in)."""
    if site.keep >= n_in:
        return 0
    flops = 0
    if site.score == "attn":
        flops += attn_score_flops(text_config, n_text + n_in)
    if site.anchors == "bipartite":
        return flops + bipartite_flops(text_config, n_in, site.layer)
    if site.merge > 0:
        hard_locality = site.locality == float("inf")
        flops += merge_flops(text_config, n_in, site.keep, site.layer,
                             similarity=site.sharpness > 0 and not hard_locality)
    return flops


def plan_cost(text_config, plan, n_visual: int | None = None, n_text: float = 0.0, causal: bool = True) -> dict:
    """Prefill cost of ``plan`` (a Plan, plan dict, path, or None) relative to the unreduced model.

    Returns flops_ratio, flops, flops_full, overhead_flops, visual_tokens_per_layer (tokens
    entering each decoder layer), avg_visual_tokens (their layer average: the FLOPs-equivalent
    count some papers report, docs/DESIGN.md section 4), entering_tokens (visual tokens entering the LLM),
    n_visual, n_text."""
    g = dims(text_config)
    L = g["L"]
    text_config = g  # read the config once
    if plan is not None and not hasattr(plan, "sites"):
        from .plan import load_plan

        plan = load_plan(plan)
    if n_visual is None:
        if plan is None:
            raise UserError("plan_cost needs n_visual when no plan is given")
        n_visual = plan.visual_tokens
    if plan is not None and plan.backbone and int(plan.backbone.get("num_layers", L)) != L:
        raise UserError(f"plan backbone.num_layers = {plan.backbone['num_layers']} does not match the model's "
                        f"{L} decoder layers")
    sites = list(plan.sites) if plan is not None else []
    by_layer = {s.layer: s for s in sites}
    v, overhead, n = [], 0, n_visual
    for layer in range(L):
        s = by_layer.get(layer)
        if s is not None:
            overhead += site_overhead_flops(text_config, s, n, n_text)
            n = s.keep
        v.append(n)
    flops = sequence_flops(text_config, v, n_text, causal) + overhead
    full = full_flops(text_config, n_visual, n_text, causal)
    return {"flops_ratio": float(flops / full), "flops": float(flops), "flops_full": float(full),
            "overhead_flops": float(overhead), "visual_tokens_per_layer": [int(x) for x in v],
            "avg_visual_tokens": float(sum(v) / L), "entering_tokens": int(v[0]),
            "n_visual": int(n_visual), "n_text": float(n_text), "causal": causal}
