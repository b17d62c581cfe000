"""The public entry points: :func:`apply_plan` (a model wrapped with a plan: forward and ``generate``
on a reduced KV cache, as a LlavaForConditionalGeneration is called) and :func:`search_forward` (the
search's hard forward with tensor knobs)."""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ...errors import UserError
from .attention import SUPPORTED_ATTENTION, attn_implementation
from .cache import ReducedCache
from .forward import run


def _check_model(model) -> None:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(inner.language_model, "layers"):
        raise UserError(f"apply_plan needs a LlavaForConditionalGeneration with a Llama-family decoder, got "
                        f"{type(model).__name__}")
    impl = attn_implementation(model)
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
        res = run(self.model, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
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
                               past_key_values=cache_of(out), use_cache=True, logits_to_keep=1)


# transformers 5.24 renamed the output fields (past_key_values -> cache, image_hidden_states ->
# image_outputs, whose pooler_output `image_hidden_states` now reads): build whichever this version has.
_OUTPUT_FIELDS = set(getattr(LlavaCausalLMOutputWithPast, "__dataclass_fields__", {}))


def cache_of(out):
    """The KV cache of a forward's output, by the field name this transformers version has (reading the
    old name on 5.24+ is a deprecation warning)."""
    return out.cache if "cache" in _OUTPUT_FIELDS else out.past_key_values


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
        from ...plan import load_plan

        plan = load_plan(plan)
    validate = getattr(plan, "validate_for", None)
    if validate is not None:
        validate(model.config)
    _check_model(model)
    return ReducedLlava(model, plan, seed=plan_seed(plan) if seed is None else int(seed))


def plan_seed(plan) -> int:
    """What seeds a plan's ``random`` score: its own seed if it records one, else its search's, else 0."""
    seed = getattr(plan, "seed", None)
    if seed is None:
        search = getattr(plan, "search", None) or {}
        seed = search.get("seed", 0) if isinstance(search, dict) else 0
    return int(seed or 0)


def search_forward(model, sites: Sequence, input_ids: Tensor, attention_mask: Tensor | None = None,
                   pixel_values: Tensor | None = None, *, position_ids: Tensor | None = None,
                   logits_to_keep: int | Tensor = 0, query_index: Tensor | None = None,
                   checkpoint: bool = False, vision: dict | None = None, seed: int = 0) -> Tensor:
    """The search's forward: logits of the *reduced* sequence (or its last ``logits_to_keep``) under hard
    ``sites`` (objects with Site's fields, at most one per layer) whose knobs may be tensors that require
    grad: the loss is differentiable in merge / sharpness / locality / reweight through the really
    shortened sequence. ``query_index`` (B,): the last prompt token of a teacher-forced answer, so ``attn``
    scores are what generation sees. ``checkpoint``: activation checkpointing over the decoder layers.
    ``vision``: :func:`encode_images` of ``pixel_values`` (then ``pixel_values`` only marks that there is an
    image), so several plans on one batch share one vision pass. ``seed``: the ``random`` score's
    (:func:`plan_seed` of a plan)."""
    _check_model(model)
    sites = _ordered_sites(sites, len(model.model.language_model.layers), "search site")
    res = run(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               pixel_values=pixel_values, hard_sites=sites, use_cache=False, query_index=query_index,
               checkpoint=checkpoint, vision=vision, seed=seed)
    return model.lm_head(slice_logits_to_keep(res.hidden, logits_to_keep))
