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

The package, one module per piece:

* :mod:`.attention`: RoPE, masks, the attention implementation;
* :mod:`.hooks`: q/k capture by forward hooks, FastV and CLS scores from them;
* :mod:`.cache`: :class:`ReducedCache`, the KV cache of a reduced prefill;
* :mod:`.forward`: the decoder loop with sites, decoding on a reduced cache, :func:`stage_timer`;
* :mod:`.reduced`: :func:`apply_plan` / :class:`ReducedLlava` and :func:`search_forward`.
"""
from __future__ import annotations

from .attention import SUPPORTED_ATTENTION
from .cache import ReducedCache
from .forward import encode_images, reweight_after, stage_timer
from .reduced import ReducedLlava, apply_plan, cache_of, plan_seed, search_forward

__all__ = ["SUPPORTED_ATTENTION", "ReducedCache", "ReducedLlava", "apply_plan", "cache_of", "encode_images",
           "plan_seed", "reweight_after", "search_forward", "stage_timer"]
