"""lmms-eval model ``diffopsearch``: a LLaVA backbone with a reduction plan, scored by lmms-eval's own
tasks and metrics (extra ``diffopsearch[lmms]``)::

    lmms-eval --model diffopsearch --tasks gqa --batch_size 16 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plan=outputs/DATE/TIME_search/plan.json

``--model_args`` (comma separated ``key=value``):

- ``pretrained``: a Hugging Face id, a local ``save_pretrained`` directory, or ``toy`` (the shipped
  toy backbone); default ``llava-hf/llava-1.5-7b-hf``.
- ``plan``: a ``plan.json``, a search run directory holding one, or a baseline name (``none``,
  ``fastv``, ``tome``, ``pool``, ``prumerge``, ``visionzip``, ``random``) with ``budget=`` (and
  optionally ``layer=``, ``seed=``); default: none (the unreduced model, through the same forward).
  A baseline is solved for the budget at the mean prompt length of the requests it is first asked
  (over all processes), as ``diffopsearch eval`` solves it at its data's mean prompt length.
- ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...), ``batch_size``, ``dtype`` (``auto``,
  ``float32``, ``bfloat16``, ``float16``), ``attn_implementation``, ``revision``, ``trust_remote_code``.

It follows the shape of lmms-eval's ``llava_hf`` model (the same request tuples, ``utils.Collator``
grouping by generation arguments, longest prompts first), with three differences: requests are
really batched (``batch_size`` > 1, left padded), the prompt is the one ``diffopsearch eval`` uses
(:func:`diffopsearch.data.prompts.format_context`: the task's text after the image in the backbone's
chat template), and decoding is greedy only (the reduced model refuses sampling and beam search).
Under ``accelerate launch`` each process loads the model on its own GPU and answers its share of the
requests; lmms-eval gathers them. One image per request (LLaVA-1.5's setting) or none (text only,
run unreduced); videos and several images per request are refused.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from loguru import logger as eval_logger
from tqdm import tqdm

from ..errors import UserError
from . import LMMS_MODEL_ID

DEFAULT_MAX_NEW_TOKENS = 1024  # llava_hf's, for a task whose generation_kwargs name none
ARGS = ("pretrained", "plan", "budget", "layer", "seed", "device", "batch_size", "dtype", "attn_implementation",
        "revision", "trust_remote_code")


@register_model(LMMS_MODEL_ID)
class DiffopsearchLlava(lmms):
    """lmms-eval's ``lmms`` interface over ``diffopsearch.apply_plan(model, plan)``."""

    is_simple = True

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", plan: Optional[str] = None,
                 budget: Optional[float] = None, layer: Optional[int] = None, seed: int = 0, device: str = "auto",
                 batch_size=1, dtype: str = "auto", attn_implementation: str = "sdpa", revision: Optional[str] = None,
                 trust_remote_code: bool = False, max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise UserError(f"--model diffopsearch got unknown model_args {', '.join(sorted(kwargs))}; "
                            f"it takes {', '.join(ARGS)}.")
        from ..backbone.load import load_backbone
        from ..config import MODEL_DTYPES, PLAN_NAMES, ModelConfig, check_budget
        from ..evaluate import resolve_plan
        from ..runtime import make_accelerator

        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise UserError(f"batch_size={batch_size!r} is not valid for --model diffopsearch: give a number of "
                            "requests per batch (no 'auto').") from None
        if self.batch_size_per_gpu < 1:
            raise UserError(f"batch_size={batch_size!r} is not valid: it must be >= 1.")
        if str(dtype) not in MODEL_DTYPES:
            raise UserError(f"dtype={dtype!r} is not valid: use one of {', '.join(MODEL_DTYPES)}.")
        pretrained = str(pretrained)
        toy = pretrained == "toy"
        model_cfg = ModelConfig(name="toy" if toy else pretrained, path="" if toy else pretrained, dtype=str(dtype),
                                attn_implementation=str(attn_implementation), revision=revision,
                                trust_remote_code=bool(trust_remote_code), device=str(device or "auto"))

        # the plan: a file is read and checked now; a baseline is solved at the requests' prompt length
        name = "none" if plan in (None, "") else str(plan)
        baseline = name in PLAN_NAMES
        if baseline and name != "none" and budget is None:
            raise UserError(f"plan={name} is a baseline: give its FLOPs budget too, e.g. plan={name},budget=0.5.")
        self._plan_spec = {"ckpt": None if baseline else name, "name": name if baseline else "none", "layer": layer,
                           "seed": int(seed), "budget": 1.0 if budget is None else check_budget(budget)}
        if not baseline:
            from ..evaluate import plan_source

            plan_source(self._plan_spec["ckpt"])  # a bad path fails before the model is loaded

        self.accelerator = make_accelerator(model_cfg.device)
        multi = self.accelerator.num_processes > 1
        self._model, self.processor = load_backbone(model_cfg, device=self.accelerator.device if multi else None)
        self._device = next(self._model.parameters()).device
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.pretrained = pretrained
        self.chat_template = None  # the backbone's own (read by lmms-eval's --apply_chat_template)
        self.plan = None
        self._reduced = None
        if not baseline or name == "none":  # (no sites: the prompt length only enters its cost record)
            self._use_plan(resolve_plan(self._model, 0.0, **self._plan_spec))

    # ------------------------------------------------------------------ what lmms-eval reads
    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> List[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens):
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ the plan
    def _use_plan(self, plan) -> None:
        from ..patch.llava import apply_plan

        self.plan = plan
        self._reduced = apply_plan(self._model, plan)
        if self._rank == 0:
            per_layer = plan.visual_tokens_per_layer()
            eval_logger.info(f"diffopsearch plan {plan.method!r}: {len(plan.sites)} site(s) at layers "
                             f"{[s.layer for s in plan.sites]}, visual tokens per layer {per_layer}, "
                             f"FLOPs ratio {plan.cost.get('flops_ratio', 'n/a')}")

    def _ensure_plan(self, contexts) -> None:
        """Solve a baseline plan at the mean prompt length of ``contexts`` (all processes' together)."""
        if self._reduced is not None:
            return
        from ..data.prompts import format_context
        from ..evaluate import resolve_plan
        from ..runtime import Procs

        lens = [len(x) - 1 for x in self.tokenizer([format_context(c, self.processor) for c in contexts])["input_ids"]]
        total = Procs(self.accelerator).gather([(sum(lens), len(lens))])
        n = sum(c for _, c in total)
        self._use_plan(resolve_plan(self._model, sum(s for s, _ in total) / max(n, 1), **self._plan_spec))

    # ------------------------------------------------------------------ inputs
    def _images(self, doc_to_visual, task, split, doc_id) -> list:
        import PIL.Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if any(not isinstance(v, PIL.Image.Image) for v in visuals):
            raise UserError(f"task {task!r} gives {type(visuals[0]).__name__} visuals: --model diffopsearch takes "
                            "images (PIL) only, not videos or audio.")
        if len(visuals) > 1:
            raise UserError(f"task {task!r} gives {len(visuals)} images for one request: the reduced LLaVA takes "
                            "one image per request (or none).")
        return [v.convert("RGB") for v in visuals]

    def _batches(self, items: list, texts: list, images: list):
        """(positions, model inputs) for ``items`` (indices into texts / images): the requests with an
        image and those without are encoded apart (the processor takes one kind per call)."""
        from ..data.datasets import encode_prompts
        from ..runtime import to_device

        for want in (1, 0):
            pos = [i for i in items if len(images[i]) == want]
            if pos:
                enc = encode_prompts(self.processor, [texts[i] for i in pos], [im for i in pos for im in images[i]])
                yield pos, to_device(enc, self._device, self._model.dtype)

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: List[Instance]) -> List[str]:
        from ..data.prompts import format_context
        from ..evaluate import generate_answers

        if not requests:
            return []
        self._ensure_plan([r.args[0] for r in requests])

        def _collate(x):  # longest prompt first, as llava_hf: time estimates and OOMs come early
            return -len(self.tok_encode(x[0])), x[0]

        re_ords = utils.Collator([r.args for r in requests], _collate, grouping=True)
        chunks = re_ords.get_batched(n=self.batch_size, batch_fn=None)
        pbar = tqdm(total=-(-len(requests) // self.batch_size), disable=self.rank != 0, desc="Model Responding")
        res = []
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])  # the Collator grouped by generation arguments
            until, max_new_tokens = _greedy_options(gen_kwargs, self.tok_decode(self.eot_token_id))
            images = [self._images(d, t, s, i) for d, t, s, i in zip(doc_to_visual, task, split, doc_id)]
            texts = [format_context(c, self.processor, len(im)) for c, im in zip(contexts, images)]
            answers = [""] * len(chunk)
            for pos, inputs in self._batches(list(range(len(chunk))), texts, images):
                for p, a in zip(pos, generate_answers(self._reduced, self.processor, inputs, max_new_tokens)):
                    answers[p] = _cut(a, until)
            for context, answer in zip(contexts, answers):
                res.append(answer)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """Sum of the log-probabilities of each continuation (the assistant turn after the context,
        end of turn included, as llava_hf scores it) and whether greedy decoding would produce it;
        batched, on the reduced sequence."""
        import torch

        from ..data.prompts import format_context

        if not requests:
            return []
        self._ensure_plan([r.args[0] for r in requests])
        texts, images, n_cont = [], [], []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            target = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self.task_dict[task][split][doc_id])
            ims = self._images(doc_to_visual, task, split, doc_id)
            prompt = format_context(context, self.processor, len(ims))
            full = format_context(context, self.processor, len(ims), answer=str(target))
            texts.append(full)
            images.append(ims)
            n_cont.append(len(self.tok_encode(full)) - len(self.tok_encode(prompt)))
        out: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(texts[i]))
        for start in tqdm(range(0, len(order), self.batch_size), disable=self.rank != 0, desc="Model Responding"):
            for pos, inputs in self._batches(order[start:start + self.batch_size], texts, images):
                keep = max(n_cont[p] for p in pos) + 1
                with torch.inference_mode():
                    logits = self._reduced(**inputs, logits_to_keep=keep).logits.float()
                logp = torch.log_softmax(logits, -1)
                ids = inputs["input_ids"][:, -keep:]
                for b, p in enumerate(pos):  # left padded: every continuation ends at the last position
                    c = n_cont[p]
                    target, lp = ids[b, keep - c:], logp[b, keep - c - 1:keep - 1]
                    out[p] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("--model diffopsearch does not implement multi-round generation")


def _greedy_options(gen_kwargs: dict, eot: str) -> tuple[list, int]:
    """(stop strings, max_new_tokens) of a task's generation_kwargs; sampling and beams are refused."""
    until = gen_kwargs.pop("until", [eot])
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = gen_kwargs.get("temperature") or 0
    if gen_kwargs.get("do_sample") or float(temperature) > 0:
        raise UserError(f"the task asks for sampling (temperature={temperature!r}, do_sample="
                        f"{gen_kwargs.get('do_sample')!r}): the reduced model decodes greedily only; "
                        "set temperature 0 (lmms-eval --gen_kwargs temperature=0).")
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise UserError(f"the task asks for beam search (num_beams={gen_kwargs['num_beams']!r}): the reduced model "
                        "decodes greedily only.")
    return until, int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)


def _cut(text: str, until: list) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
