"""`diffopsearch eval`: accuracy and measured cost of a plan on GQA, VQAv2 or the toy world.

- Batched greedy generation (left padding, at most ``max_new_tokens``) through
  ``apply_plan(model, plan).generate``, with the lmms-eval prompt (:mod:`diffopsearch.data.prompts`).
- Multi-process through Accelerate: the questions still to answer are dealt out by index
  (process r takes pending[r::P]); after every batch step the answers of all processes are gathered
  (``accelerate.utils.gather_object``) and the main process appends them to the answer cache. So
  ``n`` and the accuracy do not depend on the number of processes, and only the main process writes.
- Resumable: the answer cache holds one line per answered question, tagged with a hash of
  everything that determines the answer (plan, model, data set, split, prompt, max_new_tokens, and
  the fingerprints of the package's code, the weight files and the data files: answers never
  outlive the code that made them; a mismatch is recomputed with one warning line).
  ``diffopsearch eval`` keeps it in ``outputs/.answers/<hash>.jsonl`` under the working directory,
  so a rerun with the same settings (in its own new run directory) only generates what is missing.
- Cost is measured, not assumed: the FLOPs ratio from :func:`diffopsearch.cost.plan_cost` at the
  data's actual mean prompt length, and the prefill latency (the reduced forward of the prompt,
  reduction included) timed after a warm-up batch, median over batches, with CUDA synchronisation.

results.json: ``accuracy`` (0..1), ``n`` (questions scored), ``n_questions``, ``per_type``
({type: {accuracy, n}}: toy family, GQA types.structural, VQAv2 answer_type), ``flops_ratio``,
``visual_tokens`` ({image, llm_input, per_layer, avg, grid}), ``mean_text_tokens``, ``cost`` (the
rest of plan_cost), ``latency`` ({prefill_ms_per_batch, prefill_ms_per_sample, batch_size,
batches_timed, warmup_batches, device}), ``throughput`` ({samples_per_s, generated, cached,
processes}), ``peak_memory_mb`` (+ ``peak_memory_kind``), ``image_errors`` ({count, examples}),
``model``, ``dataset``, ``dataset_path``, ``split``, ``metric``, ``max_new_tokens``, ``plan`` (the
plan dict), and from ``run``: ``budget``, ``ckpt``, ``limit``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

from .errors import Interrupted, UserError
from .runtime import Procs, device_of, sync, to_device  # noqa: F401  (to_device: this module's API too)

log = logging.getLogger("diffopsearch")

CACHE_NAME = "answers.jsonl"
RESULTS_NAME = "results.json"
LATENCY_BATCHES = 8
SCORE_CHUNK = 2048


# ---------------------------------------------------------------- answer cache

def settings_key(plan_dict: dict | None, model_id: str, dataset, max_new_tokens: int, prompt_probe: str,
                 origin: dict | None = None) -> str:
    """Hash of everything that determines an answer (not the batch size or process count). ``origin``:
    the code / weights / data fingerprints (:func:`answer_origin`); answers made by other code, other
    weights or other data files never match."""
    blob = json.dumps({"plan": plan_dict, "model": model_id, "dataset": [dataset.name, dataset.path, dataset.split],
                       "max_new_tokens": max_new_tokens, "prompt": prompt_probe, "origin": origin},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def answer_origin(model, dataset) -> dict:
    """What made an answer besides the settings: the code, the model weights, the data files."""
    from .fingerprint import code_fingerprint, dataset_fingerprint, model_fingerprint

    return {"code": code_fingerprint(), "weights": model_fingerprint(model), "data": dataset_fingerprint(dataset)}


def _cache_rows(path: Path | None):
    """The well-formed rows of an answer cache; a torn last line is ignored."""
    if path is None or not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "qid" in row and "prediction" in row:
                yield row


def read_cache(path: Path | None, key: str) -> dict[str, str]:
    """qid -> prediction for the lines of ``path`` made with ``key``."""
    return {str(r["qid"]): r["prediction"] for r in _cache_rows(path) if r.get("key") == key}


def stale_answers(path: Path | None, key: str, settings: str) -> int:
    """Lines with the same settings but another key: answers of other code, weights or data."""
    return sum(1 for r in _cache_rows(path) if r.get("settings") == settings and r.get("key") != key)


def _end_line(path: Path) -> None:
    """Close a torn last line (a run killed mid-write), so the next answer starts a line of its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _append_cache(path: Path, key: str, answers: list[dict], settings: str | None = None) -> None:
    if not answers:
        return
    with open(path, "a", encoding="utf-8") as f:
        for a in answers:
            f.write(json.dumps({"key": key, "settings": settings, "qid": a["qid"], "prediction": a["prediction"]})
                    + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- model calls

def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def prefill(reduced, inputs: dict) -> None:
    """The prefill alone: one reduced forward over the prompt (only the last position's logits
    where the forward supports it, as generation does)."""
    import torch

    kwargs = {"logits_to_keep": 1} if _accepts(reduced.forward, "logits_to_keep") else {}
    with torch.inference_mode():
        reduced(**inputs, **kwargs)


def generate_answers(reduced, processor, inputs: dict, max_new_tokens: int) -> list[str]:
    """Greedy answers of one left-padded batch, decoded and stripped."""
    import torch

    tok = processor.tokenizer
    with torch.inference_mode():
        out = reduced.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def measure_latency(forwards: list, dataset, processor, indices: list[int], batch_size: int, device, dtype,
                    n_batches: int = LATENCY_BATCHES) -> list[list[tuple[float, int]]]:
    """For each of ``forwards``: (prefill ms, batch size) for up to ``n_batches`` batches of ``indices``,
    after one untimed warm-up batch (the first one, timed again afterwards). The batches are built once
    and shared, so the forwards are timed on the same inputs."""
    from .data.datasets import make_eval_batch

    batches = []
    for start in range(0, len(indices), batch_size):
        recs, imgs = dataset.batch(indices[start:start + batch_size])
        if recs:
            batches.append(to_device(make_eval_batch(processor, recs, imgs), device, dtype))
        if len(batches) >= n_batches:
            break
    out = []
    for fwd in forwards:
        times = []
        if batches:
            prefill(fwd, batches[0])  # warm-up: kernels, allocator, lazy init
        for inputs in batches:
            sync(device)
            t0 = time.perf_counter()
            prefill(fwd, inputs)
            sync(device)
            times.append(((time.perf_counter() - t0) * 1000.0, int(inputs["input_ids"].shape[0])))
        out.append(times)
    return out


# ---------------------------------------------------------------- scoring and cost

def score(prediction: str, record: dict, metric: str, vqa_mode: str = "official") -> float:
    from .metrics import gqa_match, vqa_accuracy

    if metric == "vqa":
        if not record.get("answers"):
            raise UserError(f"question {record['id']!r} has no annotator answers: metric 'vqa' needs the "
                            "VQAv2 'answers' column; use dataset.metric=gqa for single-answer data.")
        return vqa_accuracy(prediction, record["answers"], mode=vqa_mode)
    if metric == "gqa":
        return 1.0 if gqa_match(prediction, record["answer"] or "") else 0.0
    raise UserError(f"dataset.metric {metric!r} is not valid: use gqa (exact match) or vqa (VQAv2 accuracy).")


def visual_token_count(config) -> tuple[int, tuple[int, int]]:
    """(visual tokens entering the LLM per image, patch grid) from a LLaVA config."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    n = getattr(config, "image_seq_length", None) or side * side
    return int(n), (side, side)


def prompt_text_lengths(processor, records: list[dict]) -> list[int]:
    """Text tokens of each evaluation prompt (the image placeholder excluded)."""
    from .data.prompts import format_prompt

    if not records:
        return []
    ids = processor.tokenizer([format_prompt(r["question"], processor) for r in records])["input_ids"]
    return [len(x) - 1 for x in ids]


def mean_prompt_text_tokens(processor, dataset, indices=None) -> float:
    indices = list(range(len(dataset))) if indices is None else list(indices)
    total, n = 0, 0
    for s in range(0, len(indices), SCORE_CHUNK):
        lens = prompt_text_lengths(processor, dataset.records(indices[s:s + SCORE_CHUNK]))
        total, n = total + sum(lens), n + len(lens)
    return total / max(n, 1)


def plan_cost(model, plan, n_visual: int, n_text: float) -> dict:
    """FLOPs ratio at ``n_text`` text tokens, and the visual tokens entering every decoder layer
    with their layer average (both conventions of docs/DESIGN.md section 4). ``plan`` None = unreduced."""
    from .cost import plan_cost as _plan_cost

    return dict(_plan_cost(model.config.text_config, plan, n_visual, n_text))


def peak_memory_mb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "process_peak_rss"


# ---------------------------------------------------------------- evaluate

def _cache_file(out_dir: Path | None, cache_path, settings: str) -> Path | None:
    """Where the answers are cached: ``cache_path`` (a folder, or a path ending in a separator: one file per
    settings key inside it), else the run dir's answers.jsonl, else nowhere."""
    cache = Path(cache_path) if cache_path is not None else (out_dir / CACHE_NAME if out_dir is not None else None)
    if cache is not None and (cache.is_dir() or str(cache_path).endswith(os.sep)):
        cache = cache / f"{settings}.jsonl"  # a shared cache folder: one file per settings, keyed lines inside
    return cache


def _write_run(out_dir: Path, results: dict, answers: dict, cache: Path | None, key: str, settings: str) -> None:
    """results.json, and the run dir's own answers.jsonl when the cache lives elsewhere (atomic writes)."""
    from .io import atomic_write_json, atomic_write_text

    if cache != out_dir / CACHE_NAME:
        atomic_write_text(out_dir / CACHE_NAME, "".join(
            json.dumps({"key": key, "settings": settings, "qid": q, "prediction": p}) + "\n"
            for q, p in answers.items()))
    atomic_write_json(out_dir / RESULTS_NAME, results)


def _generate_pending(reduced, processor, dataset, mine: list[int], n_steps: int, batch_size: int,
                      max_new_tokens: int, procs, answers: dict, cache_of: tuple, device, dtype, show: bool):
    """Greedy answers to this process's pending questions ``mine`` in ``n_steps`` batch steps (the same
    number on every process, for the gathers), added to ``answers``; each step's new answers are appended
    to the cache (``cache_of`` = (path or None, key, settings)) by the main process. Returns (answers,
    {question: image error}, questions answered here, seconds spent generating)."""
    from .data.datasets import make_eval_batch

    cache, key, settings = cache_of
    ids, n_done = dataset.ids, len(answers)
    errors: dict[str, str] = {}
    n_new, t_gen = 0, 0.0
    progress = None
    if show and procs.is_main and n_steps:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"eval {dataset.name}/{dataset.split}", total=n_steps)
    try:
        for step in range(n_steps):
            chunk = mine[step * batch_size:(step + 1) * batch_size]
            local: list[dict] = []
            if chunk:
                t0 = time.perf_counter()
                recs, imgs = dataset.batch(chunk)
                for qid in {ids[i] for i in chunk} - {r["id"] for r in recs}:
                    local.append({"qid": qid, "error": dataset.image_errors.get(qid, "image failed")})
                if recs:
                    inputs = to_device(make_eval_batch(processor, recs, imgs), device, dtype)
                    preds = generate_answers(reduced, processor, inputs, max_new_tokens)
                    local += [{"qid": r["id"], "prediction": p} for r, p in zip(recs, preds)]
                sync(device)
                t_gen += time.perf_counter() - t0
                n_new += len(recs)
            fresh = []
            for a in procs.gather(local):
                if "error" in a:
                    errors[a["qid"]] = a["error"]
                elif a["qid"] not in answers:  # de-duplicate by question id
                    answers[a["qid"]] = a["prediction"]
                    fresh.append(a)
            if procs.is_main and cache is not None:
                _append_cache(cache, key, fresh, settings)
            if progress is not None:
                progress.advance(task)
    except KeyboardInterrupt:
        # every answer gathered so far is already in the cache (appended after each batch step)
        raise Interrupted(f"after {len(answers)} of {len(ids)} answers ({len(answers) - n_done} new in this "
                          "run)") from None
    finally:
        if progress is not None:
            progress.stop()
    return answers, errors, n_new, t_gen


def _check_image_errors(dataset, answers: dict, errors: dict, procs) -> None:
    """No answer at all because no image decoded: a user error; some: one warning line."""
    if errors and not answers:
        ex = next(iter(sorted(errors.items())))
        raise UserError(f"no question of {dataset.name} split {dataset.split!r} ({dataset.path}) could be "
                        f"evaluated: the image of every one of its {len(errors)} questions is missing or cannot be "
                        f"decoded (e.g. question {ex[0]}: {ex[1]}). Check the images config / image column of "
                        "dataset.path.")
    if errors and procs.is_main:
        ex = next(iter(sorted(errors.items())))
        log.warning("%d of %d questions skipped: their image is missing or cannot be decoded (e.g. question %s: "
                    "%s); results.json lists them under image_errors.", len(errors), len(dataset.ids), ex[0], ex[1])


def evaluate(model, processor, plan, dataset, *, batch_size: int = 16, max_new_tokens: int = 16,
             accelerator=None, cache_path: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
             metric: str | None = None, vqa_mode: str = "official", model_name: str | None = None,
             latency_batches: int = LATENCY_BATCHES, resume: bool = True, show: bool = True,
             extra: dict | None = None) -> dict:
    """Evaluate ``plan`` (a Plan, or None for the unreduced model) on ``dataset`` (a
    :class:`diffopsearch.data.datasets.QADataset`) and return the results dict.

    ``out_dir``: where ``results.json`` (and by default the answer cache ``answers.jsonl``) go;
    ``cache_path`` overrides the cache location (a folder, or a path ending in a separator: one file
    per settings key inside it); with neither, nothing is written. ``resume=False``
    discards the cache first. ``metric``: gqa | vqa (default: the data set's own). ``extra``: keys
    merged into the results (e.g. the config). Every process returns the same dict; only the
    main one writes files and prints.
    """
    import torch

    from .data.prompts import format_prompt

    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must both be >= 1.")
    procs = Procs(accelerator)
    metric = metric or dataset.metric
    device = device_of(model)
    dtype = getattr(model, "dtype", torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if plan is not None:
        from .patch.llava import apply_plan

        reduced = apply_plan(model, plan)
    else:
        reduced = model
    plan_dict = plan.to_dict() if plan is not None else None
    model_id = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
    settings = settings_key(plan_dict, f"{model_id}|{dtype}", dataset, max_new_tokens, format_prompt("{q}", processor))
    key = settings_key(plan_dict, f"{model_id}|{dtype}", dataset, max_new_tokens, format_prompt("{q}", processor),
                       origin=answer_origin(model, dataset))
    out_dir = Path(out_dir) if out_dir is not None else None
    cache = _cache_file(out_dir, cache_path, settings)

    # -- resume: everyone reads the cache the main process has (maybe) just cleared
    if procs.is_main and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not resume and cache.exists():
            cache.unlink()
        _end_line(cache)
    procs.wait()
    ids = dataset.ids
    wanted = set(ids)
    done = {q: p for q, p in read_cache(cache, key).items() if q in wanted}  # limit may have shrunk
    if not done and procs.is_main and stale_answers(cache, key, settings):
        log.warning("the cached answers in %s were made by another version of diffopsearch or other model "
                    "weights or data files: recomputing them.", cache)
    pending = [i for i, q in enumerate(ids) if q not in done]
    mine = pending[procs.rank::procs.world]
    n_steps = math.ceil(math.ceil(len(pending) / procs.world) / batch_size) if pending else 0

    # -- latency: prefill only, warm, on this process's share of the questions
    share = list(range(len(dataset)))[procs.rank::procs.world]
    # with a plan, the unreduced model on the same batches too: the measured latency ratio beside the
    # plan's predicted one
    timed = [reduced, model] if plan is not None and plan.sites else [reduced]
    measured = (measure_latency(timed, dataset, processor, share, batch_size, device, dtype, latency_batches)
                if latency_batches > 0 else [])
    lat, ref = (measured + [[], []])[:2]  # the plan's times, the unreduced model's (none without a plan)

    # -- generation (every batch's answers are appended to the cache as they come: a kill loses none)
    answers, errors, n_new, t_gen = _generate_pending(
        reduced, processor, dataset, mine, n_steps, batch_size, max_new_tokens, procs, dict(done),
        (cache, key, settings), device, dtype, show)
    _check_image_errors(dataset, answers, errors, procs)

    # -- gather the measurements
    lat_all = {"plan": procs.gather(lat), "unreduced": procs.gather(ref)}
    speed = procs.gather([(n_new, t_gen)])
    mem, mem_kind = peak_memory_mb(device)
    mems = procs.gather([mem])

    results = None
    if procs.is_main:
        results = _summarise(model, processor, plan, plan_dict, dataset, answers, errors, metric, vqa_mode,
                             batch_size, max_new_tokens, lat_all, speed, max(mems), mem_kind, device,
                             procs.world, len(done), model_id)
        if extra:
            results.update(extra)
        if out_dir is not None:
            _write_run(out_dir, results, answers, cache, key, settings)
        if show:
            print_results(results)
    return procs.broadcast(results)


def _summarise(model, processor, plan, plan_dict, dataset, answers, errors, metric, vqa_mode, batch_size,
               max_new_tokens, lat_all, speed, peak_mb, mem_kind, device, world, n_cached, model_id) -> dict:
    scores: list[float] = []
    per_type: dict[str, list[float]] = {}
    text_total, text_n = 0, 0
    for s in range(0, len(dataset), SCORE_CHUNK):
        recs = dataset.records(range(s, min(s + SCORE_CHUNK, len(dataset))))
        lens = prompt_text_lengths(processor, recs)
        for rec, n_text in zip(recs, lens):
            if rec["id"] not in answers:
                continue
            sc = score(answers[rec["id"]], rec, metric, vqa_mode)
            scores.append(sc)
            per_type.setdefault(rec["type"] or "all", []).append(sc)
            text_total, text_n = text_total + n_text, text_n + 1
    n_visual, grid = visual_token_count(model.config)
    n_text = text_total / text_n if text_n else 0.0
    cost = plan_cost(model, plan, n_visual, n_text)
    per_layer = [int(x) if float(x).is_integer() else float(x) for x in cost["visual_tokens_per_layer"]]
    batch_ms = [t for t, _ in lat_all["plan"]]
    ref_ms = [t for t, _ in lat_all["unreduced"]]
    if not (plan_dict or {}).get("sites"):  # the unreduced model itself
        measured = 1.0 if batch_ms else None
    else:
        measured = statistics.median(batch_ms) / statistics.median(ref_ms) if batch_ms and ref_ms else None
    n_new = sum(n for n, _ in speed)
    wall = max((t for _, t in speed), default=0.0)
    return {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "n": len(scores),
        "n_questions": len(dataset),
        "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_type.items())},
        "flops_ratio": float(cost["flops_ratio"]),
        # docs/DESIGN.md section 4: tokens entering the LLM (first layer) and the layer average, both named.
        "visual_tokens": {
            "image": n_visual,
            "llm_input": per_layer[0] if per_layer else n_visual,
            "per_layer": per_layer,
            "avg": float(cost["avg_visual_tokens"]),
            "grid": list(grid),
        },
        "mean_text_tokens": n_text,
        "cost": {k: v for k, v in cost.items() if k not in ("flops_ratio", "visual_tokens_per_layer")},
        "latency": {
            "prefill_ms_per_batch": statistics.median(batch_ms) if batch_ms else None,
            "prefill_ms_per_sample": (statistics.median(t / b for t, b in lat_all["plan"])
                                      if lat_all["plan"] else None),
            "unreduced_prefill_ms_per_batch": statistics.median(ref_ms) if ref_ms else None,
            "ratio_measured": measured,  # plan / unreduced prefill time, same batches, this run
            "ratio_predicted": (plan_dict or {}).get("cost", {}).get("latency_ratio_predicted"),
            "batch_size": batch_size,
            "batches_timed": len(batch_ms),
            "warmup_batches": 1,
            "device": str(device),
        },
        "throughput": {
            "samples_per_s": n_new / wall if n_new and wall > 0 else None,
            "generated": n_new,
            "cached": n_cached,
            "processes": world,
        },
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": mem_kind,
        "image_errors": {"count": len(errors), "examples": dict(sorted(errors.items())[:20])},
        "model": model_id,
        "dataset": dataset.name,
        "dataset_path": dataset.path,
        "split": dataset.split,
        "metric": metric if metric == "gqa" else f"vqa/{vqa_mode}",
        "max_new_tokens": max_new_tokens,
        "plan": plan_dict,
    }


def print_results(results: dict) -> None:
    """A rich table of the headline numbers and the per-type accuracy."""
    from rich.console import Console
    from rich.table import Table

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lat, vt = results["latency"], results["visual_tokens"]
    plan = results.get("plan") or {}
    t = Table(title=f"diffopsearch eval: {results['model']} on {results['dataset']}/{results['split']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("plan", str(plan.get("method") or ("none" if not plan else "custom")))
    t.add_row(f"accuracy ({results['metric']})", f"{100 * results['accuracy']:.2f}%")
    t.add_row("questions scored", f"{results['n']} / {results['n_questions']}")
    if results["image_errors"]["count"]:
        t.add_row("skipped (image errors)", str(results["image_errors"]["count"]))
    t.add_row("FLOPs ratio", f"{results['flops_ratio']:.3f}")
    t.add_row("visual tokens (LLM input / layer avg)", f"{vt['llm_input']} / {vt['avg']:.1f}")
    t.add_row(f"prefill ms / batch (bs {lat['batch_size']})", fmt(lat["prefill_ms_per_batch"]))
    t.add_row("prefill ms / sample", fmt(lat["prefill_ms_per_sample"]))
    if lat.get("ratio_measured") is not None:
        pred = lat.get("ratio_predicted")
        t.add_row("latency ratio measured" + (" (predicted)" if pred is not None else ""),
                  fmt(lat["ratio_measured"], ".3f") + (f" ({pred:.3f})" if pred is not None else ""))
    t.add_row("throughput (samples/s)", fmt(results["throughput"]["samples_per_s"]))
    t.add_row("peak memory (MB)", f"{results['peak_memory_mb']:.0f}")
    console = Console()
    console.print(t)
    if results["per_type"]:
        pt = Table(title="accuracy per type")
        pt.add_column("type")
        pt.add_column("n", justify="right")
        pt.add_column("accuracy", justify="right")
        for k, v in results["per_type"].items():
            pt.add_row(k, str(v["n"]), f"{100 * v['accuracy']:.2f}%")
        console.print(pt)


# ---------------------------------------------------------------- which plan

def find_plan_file(ckpt: str) -> Path:
    """``ckpt`` is a plan.json or a run directory holding one (searched one level down too, for a
    search run whose plan sits in a sub-folder)."""
    p = Path(ckpt).expanduser()
    if not p.exists():
        raise UserError(f"ckpt {ckpt!r} does not exist: give a plan.json file or a search run directory "
                        "that holds one.")
    if p.is_file():
        return p
    direct = p / "plan.json"
    if direct.is_file():
        return direct
    below = sorted(p.glob("*/plan.json"))
    if len(below) == 1:
        return below[0]
    if below:
        raise UserError(f"ckpt {ckpt!r} holds several plans ({', '.join(str(b) for b in below[:5])}): "
                        "point ckpt at one plan.json.")
    raise UserError(f"ckpt {ckpt!r} is a directory without a plan.json: point it at a finished search run "
                    "(its plan.json is written when the search ends) or at a plan file.")


def plan_source(ckpt: str | None, name: str = "none") -> Path | None:
    """Check a plan file (``ckpt``) or a baseline ``name`` before anything heavy is loaded: the plan file,
    or None for a baseline."""
    if not ckpt:
        return None
    if name != "none":
        raise UserError(f"both ckpt={ckpt!r} and plan={name!r} were given: evaluate either a searched plan "
                        "(ckpt=...) or a baseline (plan=... budget=...), not both.")
    return find_plan_file(str(ckpt))


def resolve_plan(model, n_text: float, *, ckpt: str | None = None, name: str = "none", budget: float = 1.0,
                 layer: int | None = None, seed: int = 0, latency=None):
    """The plan to evaluate: ``ckpt`` (a plan file / run dir), else the baseline ``name`` at ``budget``
    (``none`` = the unreduced model through the same forward), sized by FLOPs or, with a ``latency``
    model, by predicted time."""
    plan_file = plan_source(ckpt, name)
    if plan_file is not None:
        from .plan import load_plan

        plan = load_plan(str(plan_file))
        plan.validate_for(model.config)
        return plan
    from .baselines import make_plan

    n_visual, grid = visual_token_count(model.config)
    return make_plan(name, float(budget), model.config.text_config, n_visual, grid, n_text, layer=layer,
                     seed=int(seed), latency=latency)
