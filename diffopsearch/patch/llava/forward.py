"""The decoder loop with sites (see the package docstring): LLaVA's own embedding code, then the
language model's layers run by this loop, the visual segment reduced at each site's layer
(:func:`run`); decoding steps on a reduced cache (:func:`decode`); one vision pass shared by several
forwards (:func:`encode_images`); and :func:`stage_timer`, the public hook that times the reduction
step inside the forward (the benchmark's operator overhead)."""
from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ...errors import UserError
from ...operators.reduce import hard_reduce, is_zero
from ...operators.rows import take_rows
from ...operators.scores import norm_scores, random_scores
from .attention import attn_implementation, build_mask, cache_kw, grid_side, vision_layers
from .cache import ReducedCache
from .hooks import Capture, cls_attention, fastv_scores


_RECORD: Callable[[str, float], None] | None = None   # set while a stage_timer block runs
_SYNC: Callable[[], None] | None = None


@contextlib.contextmanager
def stage_timer(record: Callable[[str, float], None], sync: Callable[[], None] | None = None):
    """For as long as the block runs, every reduced forward calls ``record(stage, seconds)`` after each
    timed stage: ``"reduce"``, one site's reduction step (its scores, similarity keys, ``hard_reduce``, the
    splice back into the sequence and the rotary tables of the shortened sequence) and the CLS score read
    from the vision tower's q/k; ``"setup"``, what a forward with sites does once before the first (find the
    visual segment, its grid coordinates and sizes); ``"layer"``, one decoder layer's call (the latency
    model's per-layer time, measured where it runs). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each stage, so asynchronous devices are timed too.
    Off (the default), a stage costs one ``is None`` check."""
    global _RECORD, _SYNC
    saved = _RECORD, _SYNC
    _RECORD, _SYNC = record, sync
    try:
        yield
    finally:
        _RECORD, _SYNC = saved


@contextlib.contextmanager
def _stage(name: str):
    if _RECORD is None:
        yield
        return
    record, sync = _RECORD, _SYNC
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync is not None:
            sync()
        record(name, time.perf_counter() - t0)


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
    common: int | None = None      # the start shared by every row (batch 1, equal prompt lengths), else None

    def index(self) -> Tensor:
        return self.start[:, None] + torch.arange(self.n, device=self.start.device)

    def take(self, x: Tensor) -> Tensor:
        """The segment's rows of x (B, T, ...): a slice when every row starts at the same offset (no gather)."""
        if self.common is not None:
            return x[:, self.common:self.common + self.n]
        return take_rows(x, self.index())


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


# Longer than most on purpose: the decoder loop threads its running state (sequence, visual segment, cache,
# masks) through every line; each stage it calls is a helper below (_embed, _visual_state, _scores, _keys,
# _apply_hard, decode).
def run(model, *, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
         pixel_values=None, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None,
         mm_encoder_outputs=None, hard_sites: Sequence = (), use_cache=False,
         past_key_values: ReducedCache | None = None, seed: int = 0, n_expected: int | None = None,
         query_index: Tensor | None = None, checkpoint: bool = False, vision: dict | None = None) -> _Result:
    """One forward through the language model with reduction. Prefill when ``past_key_values`` is empty
    (sites act), decoding on a ``ReducedCache`` otherwise (no sites; per-layer masks). ``checkpoint``:
    recompute each decoder layer in the backward instead of keeping its activations (the search)."""
    lm = model.model.language_model
    layers = lm.layers
    impl = attn_implementation(model)
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

    vfl = vision_feature_layer if vision_feature_layer is not None else model.config.vision_feature_layer
    vfss = (vision_feature_select_strategy if vision_feature_select_strategy is not None
            else model.config.vision_feature_select_strategy)
    need_cls = pixel_values is not None and any(s.score == "cls" for s in hard_sites)
    inputs_embeds, image_features, special, cls = _embed(model, input_ids, inputs_embeds, pixel_values,
                                                         mm_encoder_outputs, vision, image_sizes, vfl, vfss, need_cls)
    pos = (position_ids.to(device) if position_ids is not None
           else torch.arange(T, device=device)[None]).expand(B, T)
    seq = _Seq(h=inputs_embeds, pos=pos, kpm=new_kpm,
               orig=torch.arange(T, device=device)[None].expand(B, T), bias=None)
    vis = None
    if hard_sites and special is not None and bool(special.any()):
        with _stage("setup"):
            vis = _visual_state(model, special, n_expected, vfss, cls)
    by_layer_hard = {s.layer: s for s in hard_sites} if vis is not None else {}

    # ---- hooks: layer l-1's q (last token) and k for every site at l > 0
    cap = Capture()
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
                with _stage("reduce"):
                    scores = _scores(site.score, l, seq, vis, cap, prev, layers, (input_ids, new_kpm, seed),
                                     query_index)
                    keys = _keys(l, seq, vis, cap, layers)
                    seq, vis = _apply_hard(seq, vis, site, scores, keys)
                    cos, sin = lm.rotary_emb(seq.h, position_ids=seq.pos)
                dirty = True
            if dirty:
                mask = build_mask(seq.kpm, seq.bias, seq.h.shape[1], impl, dtype)
                if cache is not None:
                    cache.segment_kpm.append(seq.kpm)
                    cache.segment_bias.append(seq.bias)
                dirty = False
            if cache is not None:
                cache.segment_of_layer.append(len(cache.segment_kpm) - 1)
            prev = (seq.kpm, seq.bias, cos, sin)
            kw = dict(attention_mask=mask, position_ids=seq.pos, use_cache=use_cache,
                      position_embeddings=(cos, sin), **{cache_kw(layer): cache})
            if checkpoint and seq.h.requires_grad:  # memory: recompute this layer in the backward
                seq.h = torch.utils.checkpoint.checkpoint(layer, seq.h, use_reentrant=False, **kw)
            else:
                with _stage("layer"):
                    seq.h = layer(seq.h, **kw)
            cap.q.pop(l - 1, None), cap.k.pop(l - 1, None)   # free what is no longer needed
    finally:
        cap.close()
    if cache is not None:
        cache.seen_tokens = T
    kept = vis.take(seq.pos) if vis is not None else None
    return _Result(hidden=lm.norm(seq.h), cache=cache, image_features=image_features, orig=seq.orig,
                   kept_positions=kept)


def _embed(model, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, vision, image_sizes, vfl, vfss,
           need_cls: bool):
    """LLaVA's own embedding code (vision tower, projector, placeholder scatter): the embeddings with the
    image features in, the features, the (B, T) image-token mask (None without an image) and the CLS
    scores (None unless ``need_cls`` or given in ``vision``)."""
    if pixel_values is not None and mm_encoder_outputs is not None:
        raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
    enc, cls = dict(mm_encoder_outputs or {}), None
    if vision is not None:  # encoded once for several forwards of one batch (the search)
        enc["image"], cls = vision["image"], vision["cls"]
    elif enc.get("image") is None and pixel_values is not None:
        enc["image"], cls = _encode(model, pixel_values, vfl, vfss, image_sizes, need_cls)
    if enc.get("image") is None:
        return inputs_embeds, None, None, cls
    image_features = torch.cat(list(enc["image"].pooler_output), dim=0).to(inputs_embeds.device,
                                                                         inputs_embeds.dtype)
    special = model.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
    return inputs_embeds.masked_scatter(special, image_features), image_features, special[..., 0], cls


def _visual_state(model, special: Tensor, n_expected: int | None, vfss: str, cls) -> _Visual:
    """The visual segment's running state before the first site: offset, count, grid coordinates, sizes 1."""
    if vfss != "default":
        raise UserError(f"vision_feature_select_strategy {vfss!r} is not supported with reduction: "
                        "only 'default' (CLS dropped, a square patch grid) is")
    start, n = _visual_segment(model, special, n_expected)
    g = grid_side(model)
    if g * g != n:
        raise UserError(f"the image gives {n} visual tokens, not a {g}x{g} grid: cannot place grid coordinates")
    B, device = special.shape[0], special.device
    i = torch.arange(n, device=device)
    coords = torch.stack([i // g, i % g], -1).float()[None].expand(B, n, 2)
    common = int(start[0]) if bool((start == start[0]).all()) else None
    return _Visual(start=start, n=n, coords=coords, sizes=torch.ones(B, n, device=device), cls=cls, common=common)


def _encode(model, pixel_values, vfl, vfss, image_sizes, need_cls: bool):
    """LLaVA's image features (its own ``get_image_features``) and, when ``need_cls``, the CLS attention of
    the CLIP layer that produces them, read by hooks during the same pass."""
    cap, cls_attn, cls = Capture(), None, None
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
        with _stage("reduce"):
            cls = cls_attention(cls_attn, cap.q["cls"], cap.k["cls"])
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
    vlayers = vision_layers(model)
    idx = max(vfl) if isinstance(vfl, (list, tuple)) else vfl
    hs = idx if idx >= 0 else len(vlayers) + 1 + idx      # hidden_states has len(layers) + 1 entries
    return vlayers[hs - 1].self_attn if hs >= 1 else None


def _scores(kind: str, l: int, seq: _Seq, vis: _Visual, cap: Capture, prev, layers, sample, query_index=None):
    """(B, n) float32 importance of the current visual tokens for one hard site. ``sample`` = (input_ids,
    attention mask, seed) of the original input, which seeds ``random`` per sample."""
    if kind == "attn":
        if l == 0:
            raise UserError("score 'attn' needs a decoder layer before the site: a site at layer 0 cannot use it")
        kpm, bias, cos, sin = prev
        return fastv_scores(layers[l - 1].self_attn, cap.q[l - 1], cap.k[l - 1], cos, sin, kpm, bias, vis.index(),
                             _query_after(query_index, seq))
    if kind == "cls":
        if vis.cls is None:
            raise UserError("score 'cls' needs the vision tower's attention: pass pixel_values (not "
                            "mm_encoder_outputs) and a vision_feature_layer after the first CLIP layer")
        return vis.cls
    if kind == "norm":
        return norm_scores(vis.take(seq.h))
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


def _keys(l: int, seq: _Seq, vis: _Visual, cap: Capture, layers) -> Tensor:
    """Similarity keys (B, n, dk) of the current visual tokens."""
    if l == 0:
        return vis.take(seq.h)
    k = cap.k[l - 1]
    hd = layers[l - 1].self_attn.head_dim
    k = vis.take(k)
    return k.view(*k.shape[:2], -1, hd).mean(2)


def _splice(full: Tensor, new: Tensor, src: Tensor) -> Tensor:
    return take_rows(torch.cat([full, new], 1), src)


def _apply_hard(seq: _Seq, vis: _Visual, site, scores, keys) -> tuple[_Seq, _Visual]:
    """Reduce the visual segment to ``site.keep`` tokens and splice them back at the same offset."""
    B, T, d = seq.h.shape
    n = vis.n
    x = vis.take(seq.h)
    pos = vis.take(seq.pos)
    # hard_reduce returns the survivors in original position order: the segment's causal order stays the
    # original one without sorting again
    red = hard_reduce(x, keys, scores, pos, vis.coords, vis.sizes, site)
    k = red.x.shape[1]
    ridx, x_new, sizes = red.index, red.x.to(seq.h.dtype), red.sizes.float()

    if vis.common is not None:  # every row's segment at the same offset: slices and one cat
        c = vis.common

        def splice(full: Tensor, new: Tensor) -> Tensor:
            return torch.cat([full[:, :c], new, full[:, c + n:]], 1)
    else:
        j = torch.arange(T - n + k, device=seq.h.device)[None]
        s = vis.start[:, None]
        src = torch.where(j < s, j, torch.where(j < s + k, T + j - s, j - k + n))

        def splice(full: Tensor, new: Tensor) -> Tensor:
            return _splice(full, new, src)
    # reweight (proportional attention): a token that stands for s original tokens is heard as s of them,
    # so its key bias is rho * log(s) of its *current* size, never a sum over the sites it passed
    # (docs/DESIGN.md section 2); text keys get none
    rho = reweight_after(vis.rho, getattr(site, "reweight", 0.0))
    bias = seq.bias
    if bias is not None or not is_zero(rho):
        vb = rho * torch.log(sizes.clamp_min(1e-12))
        bias = splice(bias if bias is not None else torch.zeros(B, T, device=seq.h.device), vb)
    new = _Seq(h=splice(seq.h, x_new), pos=splice(seq.pos, red.pos),
               kpm=splice(seq.kpm, torch.ones(B, k, dtype=torch.bool, device=seq.kpm.device)),
               orig=splice(seq.orig, vis.take(seq.orig).gather(1, ridx)), bias=bias)
    newvis = _Visual(start=vis.start, n=k, coords=red.coords.float(), sizes=sizes,
                     cls=vis.cls.gather(1, ridx) if vis.cls is not None else None, rho=rho, common=vis.common)
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
        masks.append(build_mask(cache.segment_kpm[s], cache.segment_bias[s], q, impl, h.dtype))
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    for l, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=masks[cache.segment_of_layer[l]], position_ids=pos, use_cache=True,
                  position_embeddings=(cos, sin), **{cache_kw(layer): cache})
    cache.seen_tokens += q
    return _Result(hidden=lm.norm(h), cache=cache, image_features=None, orig=None, kept_positions=None)
