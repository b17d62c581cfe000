"""The reduced LLaVA forward: a plan run inside the language model.

transformers 5.x ``LlavaModel.forward`` refuses a mismatch between image features and image placeholder
tokens, so reduction cannot happen by dropping features before the merge. Instead this module reuses
LLaVA's own embedding code (vision tower, projector, placeholder scatter) and then runs a decoder loop
of its own over ``model.model.language_model.layers`` with the model's rotary embedding, final norm and
``lm_head``. That loop is where sites act: layers before a site see every token; at a site's layer the
visual segment is reduced by ``operators.reduce.hard_reduce`` and later layers run on the really shorter
sequence (FLOPs, memory and latency drop). Surviving tokens keep their original position ids. Generation
reduces at prefill and decodes on the reduced KV cache (FastV's cached variant): each layer keeps the
cache length it was run with, and every layer gets an attention mask matching its own cache.

The search runs the same hard forward (:func:`search_forward`) with sites whose continuous knobs
(merge, sharpness, locality, reweight) are tensors: the loss is differentiable in them through the
really reduced sequence, optionally with activation checkpointing over the decoder layers.

Conventions:

* The visual segment is where ``input_ids == config.image_token_id``: one image per sample, contiguous,
  the same count ``n`` in every row (left padding moves the offset, not the count), so after a site every
  row has the same length again.
* ``attn`` scores are FastV's signal: the attention of the last prompt token to each visual token in
  layer ``l - 1``, softmax over all keys that layer saw (with its padding mask and key bias), mean over
  heads, RoPE applied. q/k come from forward hooks on that layer's ``q_proj``/``k_proj``, so the model keeps
  running with SDPA and never needs ``output_attentions``. With a teacher-forced answer after the prompt
  (the search) pass ``query_index`` = the last prompt token, so the score neither peeks at the answer nor
  differs from what generation sees (keys after it are causally masked). ``cls`` is the vision tower's CLS attention to
  the patches in the CLIP layer that produces the LLaVA feature layer (``vision_feature_layer``, -2 for
  LLaVA-1.5), from that layer's q/k the same way. ``norm`` is the L2 norm of the visual hidden states
  entering the site; ``random`` is seeded per sample from the plan seed, the site layer and the sample's
  token ids, so it does not depend on batch composition.
* Similarity keys at a site before layer ``l > 0`` are layer ``l - 1``'s keys before RoPE (content only),
  mean over key/value heads, shape (B, n, head_dim); before layer 0 the hidden states themselves.
* Reweighting (proportional attention): after a site with ``reweight = rho > 0`` every visual key column
  carries the bias ``rho * log(size)`` in all later layers, ``size`` being the token's *current*
  cumulative size: a token standing for s original tokens is heard as s of them, however many sites
  merged it. A later site with rho = 0 keeps the rho in effect (:func:`reweight_after`). Then the mask is an additive float
  mask (SDPA and eager both take it); without any bias the fast boolean / ``is_causal`` path is kept,
  built exactly as transformers builds it, which is why an empty plan reproduces the unreduced model bit
  for bit.
* The hard forward returns logits over the *reduced* sequence (length ``T - (n - keep of the last site)``):
  text positions before the image are unchanged, the last positions are the last prompt tokens.
"""
from __future__ import annotations

import copy
import functools
import inspect
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..errors import UserError
from ..operators.reduce import hard_reduce, is_zero
from ..operators.scores import attn_scores, cls_scores, norm_scores, random_scores

SUPPORTED_ATTENTION = ("sdpa", "eager")


# ----------------------------------------------------------------------------------------------------
# The KV cache of a reduced prefill
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Small tensor helpers
# ----------------------------------------------------------------------------------------------------

def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama RoPE on (B, heads, T, hd) with cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, ...) gathered along dim 1 with index (B, k)."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def _scatter_tokens(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Out-of-place (differentiable) x[b, index[b, i]] = src[b, i]."""
    if x.dim() == 2:
        return x.scatter(1, index, src)
    return x.scatter(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*src.shape), src)


def _attention_mask(kpm: Tensor, bias: Tensor | None, q_len: int, impl: str, dtype: torch.dtype):
    """The 4D mask one decoder layer gets: queries are the last ``q_len`` of the ``kv`` keys (lower-right
    causal alignment), ``kpm`` (B, kv) marks real keys, ``bias`` (B, kv) is an additive key bias.

    Without bias this reproduces transformers' ``create_causal_mask``: ``None`` for SDPA when nothing is
    padded (``is_causal`` / single-query path), a boolean mask for SDPA, 0 / finfo.min floats for eager.
    With bias: a float mask, bias on allowed keys and finfo.min elsewhere (``where``, never ``+``, so
    half precision cannot overflow to -inf)."""
    kv = kpm.shape[1]
    if bias is None and impl == "sdpa" and (q_len == 1 or q_len == kv) and bool(kpm.all()):
        return None
    q_idx = torch.arange(kv - q_len, kv, device=kpm.device)
    causal = torch.arange(kv, device=kpm.device)[None, :] <= q_idx[:, None]
    allowed = causal[None, None] & kpm[:, None, None, :]
    if bias is None:
        if impl == "sdpa":
            return allowed
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=kpm.device), torch.finfo(dtype).min)
    return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)


@functools.lru_cache(maxsize=None)
def _cache_kw_of(layer_cls) -> str:
    params = inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_kw(layer) -> str:
    """The decoder layer's name for the KV cache argument: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name is deprecated, to be removed in 5.40); older 5.x only know the old one."""
    return _cache_kw_of(type(layer))


def _attn_implementation(model) -> str:
    layer = model.model.language_model.layers[0]
    return getattr(layer.self_attn.config, "_attn_implementation", None) or "eager"


def _vision_layers(model):
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return tower.encoder.layers


def _grid_side(model) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


# ----------------------------------------------------------------------------------------------------
# q/k capture by forward hooks (no output_attentions, no recomputation)
# ----------------------------------------------------------------------------------------------------

class _Capture:
    """Forward hooks that keep the outputs of ``q_proj``/``k_proj`` of some attention modules for one
    forward pass. ``q`` keeps only the named query rows (the last prompt token / the CLS token)."""

    def __init__(self):
        self.handles: list = []
        self.q: dict[Any, Tensor] = {}
        self.k: dict[Any, Tensor] = {}

    def watch(self, key, attn_module, q_rows: slice | None):
        def keep_k(_m, _inp, out):
            self.k[key] = out

        self.handles.append(attn_module.k_proj.register_forward_hook(keep_k))
        if q_rows is not None:
            def keep_q(_m, _inp, out):
                self.q[key] = out[:, q_rows]

            self.handles.append(attn_module.q_proj.register_forward_hook(keep_q))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _fastv_scores(attn, q_rows: Tensor, k_all: Tensor, cos: Tensor, sin: Tensor, kpm: Tensor,
                  bias: Tensor | None, vidx: Tensor, query_index: Tensor | None = None) -> Tensor:
    """FastV's signal (B, n) from one decoder layer's raw projections: ``q_rows`` the query of the last
    token (B, 1, H*hd), or of every token (B, T, H*hd) when ``query_index`` (B,) names the query token per
    sample (then keys after it are causally masked); k_all (B, T, Hkv*hd); RoPE with cos/sin (B, T, hd)."""
    B, T, _ = k_all.shape
    hd = attn.head_dim
    cos, sin = cos.float(), sin.float()
    if query_index is None:
        q_last, cq, sq, key_mask = q_rows, cos[:, -1:], sin[:, -1:], kpm
    else:
        qi = query_index.to(k_all.device).view(B, 1)
        q_last, cq, sq = _gather_tokens(q_rows, qi), _gather_tokens(cos, qi), _gather_tokens(sin, qi)
        key_mask = kpm & (torch.arange(T, device=k_all.device)[None] <= qi)
    q = _rope(q_last.float().view(B, 1, -1, hd).transpose(1, 2), cq, sq)[:, :, 0]     # (B, H, hd)
    k = _rope(k_all.float().view(B, T, -1, hd).transpose(1, 2), cos, sin)               # (B, Hkv, T, hd)
    groups = q.shape[1] // k.shape[1]
    if bias is None:
        return attn_scores(q, k, groups, visual_index=vidx, key_mask=key_mask, scale=attn.scaling)
    # a reweighting site before this layer: its key bias was part of this layer's softmax, so it is here
    logits = torch.einsum("bhd,bhsd->bhs", q, k.repeat_interleave(groups, 1)) * attn.scaling + bias[:, None]
    logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return logits.softmax(-1).mean(1).gather(1, vidx)


def _cls_attention(attn, q_cls: Tensor, k_all: Tensor) -> Tensor:
    """CLS attention (B, N) to the N patches in one CLIP layer from its raw q (B, 1, D) / k (B, 1+N, D)."""
    B, T, _ = k_all.shape
    hd = attn.head_dim
    return cls_scores(q_cls.view(B, -1, hd), k_all.view(B, T, -1, hd).transpose(1, 2), scale=attn.scale)


# ----------------------------------------------------------------------------------------------------
# The decoder loop
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Seq:
    """The running sequence: hidden states and per-token metadata, all (B, T, ...)."""

    h: Tensor
    pos: Tensor            # position ids
    kpm: Tensor            # key padding mask (True = real token)
    orig: Tensor           # index of the token in the original (unreduced) sequence
    bias: Tensor | None    # additive key bias (float32), None while no site added one


@dataclass
class _Visual:
    """The visual segment of the running sequence: ``start`` (B,) offset, ``n`` tokens, and what the
    sequence does not carry (grid coordinates, sizes, CLS scores, the reweight in effect)."""

    start: Tensor
    n: int
    coords: Tensor
    sizes: Tensor
    cls: Tensor | None
    rho: float | Tensor = 0.0      # the reweight in effect (reweight_after): key bias = rho * log(sizes)

    def index(self) -> Tensor:
        return self.start[:, None] + torch.arange(self.n, device=self.start.device)


@dataclass
class _Result:
    hidden: Tensor                   # final-normed hidden states (B, T', d)
    cache: ReducedCache | None
    image_features: Tensor | None
    orig: Tensor                     # (B, T') original index of every output position
    kept_positions: Tensor | None    # (B, k) position ids of the visual tokens after the last site


def reweight_after(rho_in, site_rho):
    """The reweight in effect after a site: the site's own when it sets one (> 0), else the one in
    effect before (a prune after a merge does not change what a token stands for, so it keeps being
    heard as its size). With every site at rho = 1 (ToMe) the bias is log(current size)."""
    return rho_in if is_zero(site_rho) else site_rho


def _visual_segment(model, special: Tensor, n_expected: int | None) -> tuple[Tensor, int]:
    """Per-row offset of the (single, contiguous) visual segment; the same count in every row."""
    counts = special.sum(1)
    n = int(counts[0])
    if n == 0 or bool((counts != n).any()):
        raise UserError(
            f"every sample must hold exactly one image of the same size to be reduced, found image-token "
            f"counts {counts.tolist()}: give each sample one image (text-only batches run unreduced)"
        )
    if n_expected is not None and n != n_expected:
        raise UserError(f"the image has {n} visual tokens but the plan expects {n_expected}")
    start = special.int().argmax(1)
    idx = (start[:, None] + torch.arange(n, device=special.device)).clamp(max=special.shape[1] - 1)
    if not bool(special.gather(1, idx).all()):
        raise UserError("the image tokens of a sample are not contiguous: one image per sample is supported")
    return start, n


def _row_seeds(input_ids: Tensor | None, kpm: Tensor, seed: int, layer: int) -> list[int]:
    """One seed per sample from its real token ids, so ``random`` scores do not depend on the batch."""
    if input_ids is None:
        return [seed * 1000003 + layer * 7919 + b for b in range(kpm.shape[0])]
    ids, mask = input_ids.cpu(), kpm.cpu()
    return [zlib.crc32(ids[b][mask[b]].numpy().tobytes(), (seed * 1000003 + layer) & 0xFFFFFFFF) for b in range(ids.shape[0])]


def _random_scores(input_ids, kpm, seed, layer, n, device) -> Tensor:
    rows = [random_scores((1, n), seed=s) for s in _row_seeds(input_ids, kpm, seed, layer)]  # per sample
    return torch.cat(rows).to(device)


def _run(model, *, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
         pixel_values=None, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None,
         mm_encoder_outputs=None, hard_sites: Sequence = (), use_cache=False,
         past_key_values: ReducedCache | None = None, seed: int = 0, n_expected: int | None = None,
         query_index: Tensor | None = None, checkpoint: bool = False, vision: dict | None = None) -> _Result:
    """One forward through the language model with reduction. Prefill when ``past_key_values`` is empty
    (sites act), decoding on a ``ReducedCache`` otherwise (no sites; per-layer masks). ``checkpoint``:
    recompute each decoder layer in the backward instead of keeping its activations (the search)."""
    lm = model.model.language_model
    layers = lm.layers
    impl = _attn_implementation(model)
    if inputs_embeds is None:
        inputs_embeds = lm.embed_tokens(input_ids)
    B, T, _ = inputs_embeds.shape
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    new_kpm = (attention_mask[:, -T:].to(device=device, dtype=torch.bool) if attention_mask is not None
               else torch.ones(B, T, dtype=torch.bool, device=device))

    if past_key_values is not None and past_key_values.seen_tokens > 0:
        if pixel_values is not None or mm_encoder_outputs is not None:
            raise UserError("pixel_values were given for a decoding step on a reduced cache: images are "
                            "only read at prefill (start a new prefill without past_key_values)")
        return _decode(model, past_key_values, inputs_embeds, new_kpm, position_ids, impl)

    # ---- embeddings: LLaVA's own code (vision tower, projector, placeholder scatter)
    vfl = vision_feature_layer if vision_feature_layer is not None else model.config.vision_feature_layer
    vfss = (vision_feature_select_strategy if vision_feature_select_strategy is not None
            else model.config.vision_feature_select_strategy)
    sites_present = bool(hard_sites)
    need_cls = pixel_values is not None and any(s.score == "cls" for s in hard_sites)
    image_features, cls = None, None
    if pixel_values is not None and mm_encoder_outputs is not None:
        raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
    enc = dict(mm_encoder_outputs or {})
    if vision is not None:  # encoded once for several forwards of one batch (the search)
        enc["image"], cls = vision["image"], vision["cls"]
    elif enc.get("image") is None and pixel_values is not None:
        enc["image"], cls = _encode(model, pixel_values, vfl, vfss, image_sizes, need_cls)
    special = None
    if enc.get("image") is not None:
        image_features = torch.cat(list(enc["image"].pooler_output), dim=0).to(device, dtype)
        special = model.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                   image_features=image_features)
        inputs_embeds = inputs_embeds.masked_scatter(special, image_features)
        special = special[..., 0]

    # ---- running state
    pos = (position_ids.to(device) if position_ids is not None
           else torch.arange(T, device=device)[None]).expand(B, T)
    seq = _Seq(h=inputs_embeds, pos=pos, kpm=new_kpm,
               orig=torch.arange(T, device=device)[None].expand(B, T), bias=None)
    vis = None
    if sites_present and special is not None and bool(special.any()):
        if vfss != "default":
            raise UserError(f"vision_feature_select_strategy {vfss!r} is not supported with reduction: "
                            "only 'default' (CLS dropped, a square patch grid) is")
        start, n = _visual_segment(model, special, n_expected)
        g = _grid_side(model)
        if g * g != n:
            raise UserError(f"the image gives {n} visual tokens, not a {g}x{g} grid: cannot place grid coordinates")
        i = torch.arange(n, device=device)
        coords = torch.stack([i // g, i % g], -1).float()[None].expand(B, n, 2)
        vis = _Visual(start=start, n=n, coords=coords, sizes=torch.ones(B, n, device=device), cls=cls)

    by_layer_hard = {s.layer: s for s in hard_sites} if vis is not None else {}

    # ---- hooks: layer l-1's q (last token) and k for every site at l > 0
    cap = _Capture()
    for l in by_layer_hard:
        if l > 0:
            want_q = by_layer_hard[l].score == "attn"
            rows = None if not want_q else slice(-1, None) if query_index is None else slice(None)
            cap.watch(l - 1, layers[l - 1].self_attn, rows)

    cache = None
    if use_cache:
        cache = past_key_values if past_key_values is not None else ReducedCache(config=lm.config)
    cos, sin = lm.rotary_emb(seq.h, position_ids=seq.pos)
    mask, prev = None, None   # mask of the current segment; (kpm, bias, cos, sin) of layer l-1
    dirty = True
    try:
        for l, layer in enumerate(layers):
            if l in by_layer_hard:
                site = by_layer_hard[l]
                scores = _scores(site.score, l, seq, vis, cap, prev, layers, (input_ids, new_kpm, seed), query_index)
                keys = _keys(l, seq, vis, cap, layers)
                seq, vis = _apply_hard(seq, vis, site, scores, keys)
                cos, sin = lm.rotary_emb(seq.h, position_ids=seq.pos)
                dirty = True
            if dirty:
                mask = _attention_mask(seq.kpm, seq.bias, seq.h.shape[1], impl, dtype)
                if cache is not None:
                    cache.segment_kpm.append(seq.kpm)
                    cache.segment_bias.append(seq.bias)
                dirty = False
            if cache is not None:
                cache.segment_of_layer.append(len(cache.segment_kpm) - 1)
            prev = (seq.kpm, seq.bias, cos, sin)
            kw = dict(attention_mask=mask, position_ids=seq.pos, use_cache=use_cache,
                      position_embeddings=(cos, sin), **{_cache_kw(layer): cache})
            if checkpoint and seq.h.requires_grad:  # memory: recompute this layer in the backward
                seq.h = torch.utils.checkpoint.checkpoint(layer, seq.h, use_reentrant=False, **kw)
            else:
                seq.h = layer(seq.h, **kw)
            cap.q.pop(l - 1, None), cap.k.pop(l - 1, None)   # free what is no longer needed
    finally:
        cap.close()
    if cache is not None:
        cache.seen_tokens = T
    kept = _gather_tokens(seq.pos, vis.index()) if vis is not None else None
    return _Result(hidden=lm.norm(seq.h), cache=cache, image_features=image_features, orig=seq.orig,
                   kept_positions=kept)


def _encode(model, pixel_values, vfl, vfss, image_sizes, need_cls: bool):
    """LLaVA's image features (its own ``get_image_features``) and, when ``need_cls``, the CLS attention of
    the CLIP layer that produces them, read by hooks during the same pass."""
    cap, cls_attn, cls = _Capture(), None, None
    if need_cls:
        cls_attn = _cls_layer(model, vfl)
        if cls_attn is not None:
            cap.watch("cls", cls_attn, slice(0, 1))
    try:
        image = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=vfl,
                                               vision_feature_select_strategy=vfss, image_sizes=image_sizes,
                                               return_dict=True)
    finally:
        cap.close()
    if cls_attn is not None:
        cls = _cls_attention(cls_attn, cap.q["cls"], cap.k["cls"])
    return image, cls


def encode_images(model, pixel_values: Tensor) -> dict:
    """The vision tower's output and CLS scores for a batch, to pass as ``vision=`` to several
    :func:`search_forward` calls on it (the search runs several plans per batch: one vision pass)."""
    vfl, vfss = model.config.vision_feature_layer, model.config.vision_feature_select_strategy
    with torch.no_grad():
        image, cls = _encode(model, pixel_values, vfl, vfss, None, True)
    return {"image": image, "cls": cls}


def _cls_layer(model, vfl):
    """The CLIP attention module whose output is the LLaVA feature layer (hidden_states[vfl])."""
    vlayers = _vision_layers(model)
    idx = max(vfl) if isinstance(vfl, (list, tuple)) else vfl
    hs = idx if idx >= 0 else len(vlayers) + 1 + idx      # hidden_states has len(layers) + 1 entries
    return vlayers[hs - 1].self_attn if hs >= 1 else None


def _scores(kind: str, l: int, seq: _Seq, vis: _Visual, cap: _Capture, prev, layers, sample, query_index=None):
    """(B, n) float32 importance of the current visual tokens for one hard site. ``sample`` = (input_ids,
    attention mask, seed) of the original input, which seeds ``random`` per sample."""
    vidx = vis.index()
    if kind == "attn":
        if l == 0:
            raise UserError("score 'attn' needs a decoder layer before the site: a site at layer 0 cannot use it")
        kpm, bias, cos, sin = prev
        return _fastv_scores(layers[l - 1].self_attn, cap.q[l - 1], cap.k[l - 1], cos, sin, kpm, bias, vidx,
                             _query_after(query_index, seq))
    if kind == "cls":
        if vis.cls is None:
            raise UserError("score 'cls' needs the vision tower's attention: pass pixel_values (not "
                            "mm_encoder_outputs) and a vision_feature_layer after the first CLIP layer")
        return vis.cls
    if kind == "norm":
        return norm_scores(_gather_tokens(seq.h, vidx))
    if kind == "random":
        input_ids, kpm, seed = sample
        return _random_scores(input_ids, kpm, seed, l, vis.n, seq.h.device)
    if kind == "none":
        return None
    raise UserError(f"score {kind!r} is not known: use attn, cls, norm, random or none")


def _query_after(query_index: Tensor | None, seq: _Seq) -> Tensor | None:
    """The query token's index in the current (possibly shortened) sequence: where its original index is."""
    if query_index is None:
        return None
    return (seq.orig == query_index.to(seq.orig.device)[:, None]).int().argmax(1)


def _keys(l: int, seq: _Seq, vis: _Visual, cap: _Capture, layers) -> Tensor:
    """Similarity keys (B, n, dk) of the current visual tokens."""
    vidx = vis.index()
    if l == 0:
        return _gather_tokens(seq.h, vidx)
    k = cap.k[l - 1]
    hd = layers[l - 1].self_attn.head_dim
    k = _gather_tokens(k, vidx)
    return k.view(*k.shape[:2], -1, hd).mean(2)


def _splice(full: Tensor, new: Tensor, src: Tensor) -> Tensor:
    return _gather_tokens(torch.cat([full, new], 1), src)


def _apply_hard(seq: _Seq, vis: _Visual, site, scores, keys) -> tuple[_Seq, _Visual]:
    """Reduce the visual segment to ``site.keep`` tokens and splice them back at the same offset."""
    B, T, d = seq.h.shape
    n, vidx = vis.n, vis.index()
    x = _gather_tokens(seq.h, vidx)
    pos = seq.pos.gather(1, vidx)
    red = hard_reduce(x, keys, scores, pos, vis.coords, vis.sizes, site)
    k = red.x.shape[1]
    # causal order inside the segment = original order: sort survivors by their position ids
    order = red.pos.argsort(dim=1)
    ridx = red.index.gather(1, order)
    x_new = _gather_tokens(red.x, order).to(seq.h.dtype)
    sizes = red.sizes.gather(1, order).float()

    j = torch.arange(T - n + k, device=seq.h.device)[None]
    s = vis.start[:, None]
    src = torch.where(j < s, j, torch.where(j < s + k, T + j - s, j - k + n))
    # reweight (proportional attention): a token that stands for s original tokens is heard as s of them,
    # so its key bias is rho * log(s) of its *current* size, never a sum over the sites it passed
    # (docs/DESIGN.md section 2); text keys get none
    rho = reweight_after(vis.rho, getattr(site, "reweight", 0.0))
    bias = seq.bias
    if bias is not None or not is_zero(rho):
        vb = rho * torch.log(sizes.clamp_min(1e-12))
        bias = _splice(bias if bias is not None else torch.zeros(B, T, device=seq.h.device), vb, src)
    new = _Seq(h=_splice(seq.h, x_new, src), pos=_splice(seq.pos, red.pos.gather(1, order), src),
               kpm=_splice(seq.kpm, torch.ones(B, k, dtype=torch.bool, device=seq.kpm.device), src),
               orig=_splice(seq.orig, seq.orig.gather(1, vidx).gather(1, ridx), src), bias=bias)
    newvis = _Visual(start=vis.start, n=k, coords=_gather_tokens(red.coords, order).float(), sizes=sizes,
                     cls=vis.cls.gather(1, ridx) if vis.cls is not None else None, rho=rho)
    return new, newvis


def _decode(model, cache: ReducedCache, h: Tensor, new_kpm: Tensor, position_ids, impl) -> _Result:
    """Decoding steps on a reduced cache: every layer attends over its own cache length."""
    lm = model.model.language_model
    B, q, _ = h.shape
    pos = (position_ids.to(h.device) if position_ids is not None
           else (torch.arange(q, device=h.device) + cache.seen_tokens)[None]).expand(B, q)
    masks = []
    for s in range(len(cache.segment_kpm)):
        cache.segment_kpm[s] = torch.cat([cache.segment_kpm[s], new_kpm], 1)
        if cache.segment_bias[s] is not None:
            cache.segment_bias[s] = torch.cat(
                [cache.segment_bias[s], torch.zeros(B, q, device=h.device)], 1)
        masks.append(_attention_mask(cache.segment_kpm[s], cache.segment_bias[s], q, impl, h.dtype))
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    for l, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=masks[cache.segment_of_layer[l]], position_ids=pos, use_cache=True,
                  position_embeddings=(cos, sin), **{_cache_kw(layer): cache})
    cache.seen_tokens += q
    return _Result(hidden=lm.norm(h), cache=cache, image_features=None, orig=None, kept_positions=None)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

def _check_model(model) -> None:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(inner.language_model, "layers"):
        raise UserError(f"apply_plan needs a LlavaForConditionalGeneration with a Llama-family decoder, got "
                        f"{type(model).__name__}")
    impl = _attn_implementation(model)
    if impl not in SUPPORTED_ATTENTION:
        raise UserError(f"attn_implementation {impl!r} is not supported by the reduced forward: load the model "
                        f"with attn_implementation='sdpa' (default) or 'eager'")


def _ordered_sites(sites, n_layers: int, what: str) -> list:
    sites = sorted(sites, key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise UserError(f"{what} layers {layers} repeat a layer: at most one site per layer")
    for s in sites:
        if not 0 <= s.layer < n_layers:
            raise UserError(f"site layer {s.layer} is out of range: the decoder has layers 0..{n_layers - 1}")
    return sites


_FORWARD_IGNORED = {"cache_position", "output_attentions", "output_hidden_states"}


class ReducedLlava:
    """A LLaVA model with a reduction plan, wrapping (not copying) the model.

    ``forward``/``__call__`` take LlavaForConditionalGeneration's arguments and return a
    ``LlavaCausalLMOutputWithPast`` whose ``logits`` cover the *reduced* sequence (visual tokens removed by
    the plan are absent; the last positions are still the last prompt tokens, so ``logits[:, -1]`` is the
    next-token distribution). ``past_key_values`` is a ``ReducedCache`` that a later ``forward`` can continue
    decoding on. ``generate`` does greedy decoding with ``model.generate``'s conventions and return type.
    Every other attribute (``config``, ``device``, ``generation_config`` ...) is the wrapped model's.
    """

    def __init__(self, model, plan, seed: int = 0):
        self.model = model
        self.plan = plan
        self.seed = seed
        self.sites = _ordered_sites(plan.sites, len(model.model.language_model.layers), "plan site")
        backbone = getattr(plan, "backbone", None) or {}
        self.n_visual = backbone.get("visual_tokens") if isinstance(backbone, dict) else None
        self.last_kept_positions: Tensor | None = None   # (B, k) position ids of the kept visual tokens

    def __getattr__(self, name):
        if name in ("model", "plan", "sites"):
            raise AttributeError(name)
        attr = getattr(self.model, name)
        if inspect.ismethod(attr):
            # model.to(...), .eval(), .cuda() ... return the model itself: hand back the wrapper instead, so
            # ``apply_plan(model, plan).to(device)`` stays reduced
            @functools.wraps(attr)
            def call(*args, **kwargs):
                out = attr(*args, **kwargs)
                return self if out is self.model else out

            return call
        return attr

    def __repr__(self) -> str:
        return f"ReducedLlava(sites={self.sites!r}, model={type(self.model).__name__})"

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, labels=None, logits_to_keep=0, image_sizes=None,
                mm_encoder_outputs=None, use_cache=None, return_dict=None, query_index=None, **kwargs):
        """LlavaForConditionalGeneration.forward's arguments, plus ``query_index`` (B,) (optional, ours):
        the token whose attention gives the ``attn`` score when it is not the last one (a teacher-forced
        answer after the prompt); indices into the unreduced input."""
        for key, value in kwargs.items():
            if key in ("output_attentions", "output_hidden_states") and value:
                raise UserError(f"{key}=True is not supported by the reduced forward (sequence lengths differ "
                                "between layers); leave it False")
            if key not in _FORWARD_IGNORED:
                raise UserError(f"forward argument {key!r} is not supported by the reduced forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = bool(getattr(self.model.config.get_text_config(), "use_cache", True))
        cache = past_key_values
        if cache is not None and not isinstance(cache, ReducedCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None   # an empty cache the caller made: ours replaces it
            else:
                raise UserError("past_key_values must be the ReducedCache returned by this wrapper")
        res = _run(self.model, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                   position_ids=position_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                   vision_feature_layer=vision_feature_layer,
                   vision_feature_select_strategy=vision_feature_select_strategy,
                   mm_encoder_outputs=mm_encoder_outputs, hard_sites=self.sites, use_cache=use_cache,
                   past_key_values=cache, seed=self.seed, n_expected=self.n_visual, query_index=query_index)
        if res.kept_positions is not None:
            self.last_kept_positions = res.kept_positions
        logits = self.model.lm_head(slice_logits_to_keep(res.hidden, logits_to_keep))
        loss = None
        if labels is not None:
            if res.orig is not None:
                labels = labels.to(res.orig.device).gather(1, res.orig)
            loss = self.model.loss_function(logits=logits, labels=labels,
                                            vocab_size=self.model.config.text_config.vocab_size)
        out = _causal_lm_output(loss, logits, res.cache if use_cache else None, res.image_features,
                                None if pixel_values is None else int(pixel_values.shape[0]))
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, generation_config=None, **kwargs):
        """Greedy generation with ``model.generate``'s conventions (``inputs``/``input_ids``, ``attention_mask``,
        ``pixel_values``, ``max_new_tokens``/``max_length``, ``eos_token_id``, ``pad_token_id``,
        ``do_sample=False``, ``num_beams=1``, a ``generation_config``): returns the prompt followed by the new
        tokens, (B, T + new) LongTensor, rows that finished padded with ``pad_token_id``. Reduction happens
        at prefill; decoding runs on the reduced KV cache. Anything else that changes decoding (sampling,
        beams, logits processors, streamers ...) is a ``UserError``."""
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise UserError("generate got both `inputs` and `input_ids`: pass the prompt once")
        input_ids = inputs if input_ids is None else input_ids
        attention_mask = kwargs.pop("attention_mask", None)
        pixel_values = kwargs.pop("pixel_values", None)
        gc, model_kwargs = _generation_options(self.model, generation_config, kwargs)
        if input_ids is None:
            raise UserError("generate needs input_ids (the prompt with its image placeholder tokens)")
        B, T = input_ids.shape
        eos = gc.eos_token_id
        eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos),
                                                    device=input_ids.device)
        pad = gc.pad_token_id
        if pad is None and eos is not None:
            pad = int(eos[0])
        if attention_mask is None:
            if pad is not None and bool((input_ids == pad).any()) and (eos is None or pad not in eos.tolist()):
                attention_mask = input_ids.ne(pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        max_length = T + gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 0)

        out = self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           pixel_values=pixel_values, use_cache=True, logits_to_keep=1, **model_kwargs)
        ids, unfinished = input_ids, torch.ones(B, dtype=torch.bool, device=input_ids.device)
        while True:
            nxt = out.logits[:, -1, :].float().argmax(-1)
            if eos is not None:
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
            ids = torch.cat([ids, nxt[:, None]], 1)
            if eos is not None:
                unfinished = unfinished & ~torch.isin(nxt, eos)
            if ids.shape[1] >= max_length or not bool(unfinished.any()):
                return ids
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            position_ids = position_ids[:, -1:] + 1
            out = self.forward(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)


# transformers 5.24 renamed the output fields (past_key_values -> cache, image_hidden_states ->
# image_outputs, whose pooler_output `image_hidden_states` now reads): build whichever this version has.
_OUTPUT_FIELDS = set(getattr(LlavaCausalLMOutputWithPast, "__dataclass_fields__", {}))


def _causal_lm_output(loss, logits, cache, image_features, n_images=None) -> LlavaCausalLMOutputWithPast:
    if "image_outputs" in _OUTPUT_FIELDS:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        image = None
        if image_features is not None:  # as LlavaModel.get_image_features there: a list, one entry per image
            if torch.is_tensor(image_features) and n_images:
                image_features = list(image_features.reshape(n_images, -1, image_features.shape[-1]))
            image = BaseModelOutputWithPooling(pooler_output=image_features)
        return LlavaCausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, image_outputs=image)
    return LlavaCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                       image_hidden_states=image_features)


# generation-config fields that change greedy decoding: they must stay at their defaults here
_GREEDY_DEFAULTS = {
    "do_sample": (False, None), "num_beams": (1, None), "num_beam_groups": (1, None),
    "penalty_alpha": (None,), "repetition_penalty": (1.0, None), "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None), "bad_words_ids": (None,), "force_words_ids": (None,),
    "min_length": (0, None), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "num_return_sequences": (1, None),
    "exponential_decay_length_penalty": (None,), "max_time": (None,), "stop_strings": (None,),
    "return_dict_in_generate": (False, None), "output_scores": (False, None), "output_logits": (False, None),
    "output_attentions": (False, None), "output_hidden_states": (False, None),
    "watermarking_config": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
    "use_cache": (True, None), "cache_implementation": (None, "dynamic"),
}
_GENERATE_MODEL_KWARGS = {"image_sizes", "vision_feature_layer", "vision_feature_select_strategy"}


def _generation_options(model, generation_config, kwargs):
    """Merge ``generation_config`` / kwargs like ``model.generate`` does and reject what greedy decoding on a
    reduced cache does not implement (beam search, sampling, logits processors, ...)."""
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    try:
        unused = gc.update(**kwargs)
    except ValueError as e:  # GenerationConfig's own validation (e.g. max_new_tokens <= 0)
        raise UserError(f"generate options {kwargs!r} are not valid: {e}") from None
    model_kwargs = {}
    for key, value in unused.items():
        if key in _GENERATE_MODEL_KWARGS:
            model_kwargs[key] = value
        elif value is not None:
            raise UserError(f"generate option {key!r} is not supported by the reduced model: it supports "
                            f"input_ids, attention_mask, pixel_values, max_new_tokens / max_length, eos_token_id, "
                            f"pad_token_id and greedy decoding (do_sample=False, num_beams=1)")
    for name, allowed in _GREEDY_DEFAULTS.items():
        value = getattr(gc, name, None)
        if value not in allowed:
            raise UserError(f"generate option {name}={value!r} is not supported by the reduced model: only greedy "
                            f"decoding is (do_sample=False, num_beams=1, no logits processors); allowed: "
                            f"{', '.join(repr(a) for a in allowed)}")
    if gc.max_new_tokens is not None and gc.max_new_tokens < 1:
        raise UserError(f"max_new_tokens {gc.max_new_tokens!r} is not valid: use an integer >= 1")
    return gc, model_kwargs


def apply_plan(model, plan, seed: int | None = None) -> ReducedLlava:
    """Wrap ``model`` (a LlavaForConditionalGeneration) with ``plan`` (a Plan, a plan dict or a path to a
    plan.json). The plan is validated against the model config before any model work. ``seed`` seeds the
    ``random`` score (default: the plan's own seed if it records one, else 0)."""
    if not hasattr(plan, "sites"):
        from ..plan import load_plan

        plan = load_plan(plan)
    validate = getattr(plan, "validate_for", None)
    if validate is not None:
        validate(model.config)
    _check_model(model)
    if seed is None:
        seed = getattr(plan, "seed", None)
        if seed is None:
            search = getattr(plan, "search", None) or {}
            seed = search.get("seed", 0) if isinstance(search, dict) else 0
    return ReducedLlava(model, plan, seed=int(seed or 0))


def search_forward(model, sites: Sequence, input_ids: Tensor, attention_mask: Tensor | None = None,
                   pixel_values: Tensor | None = None, *, position_ids: Tensor | None = None,
                   logits_to_keep: int | Tensor = 0, query_index: Tensor | None = None,
                   checkpoint: bool = False, vision: dict | None = None) -> Tensor:
    """The search's forward: logits of the *reduced* sequence (or its last ``logits_to_keep``) under hard
    ``sites`` (objects with Site's fields, at most one per layer) whose knobs may be tensors that require
    grad: the loss is differentiable in merge / sharpness / locality / reweight through the really
    shortened sequence. ``query_index`` (B,): the last prompt token of a teacher-forced answer, so ``attn``
    scores are what generation sees. ``checkpoint``: activation checkpointing over the decoder layers.
    ``vision``: :func:`encode_images` of ``pixel_values`` (then ``pixel_values`` only marks that there is an
    image), so several plans on one batch share one vision pass."""
    _check_model(model)
    sites = _ordered_sites(sites, len(model.model.language_model.layers), "search site")
    res = _run(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               pixel_values=pixel_values, hard_sites=sites, use_cache=False, query_index=query_index,
               checkpoint=checkpoint, vision=vision)
    return model.lm_head(slice_logits_to_keep(res.hidden, logits_to_keep))
