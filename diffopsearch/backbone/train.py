"""Training recipe of the shipped toy backbone (scripts/train_toy.py runs it).

Why it looks like this (DESIGN section 6: a small LLaVA trained from scratch on 2 cores tends to
sit at the answer prior, because binding question words to image regions is hard):

* one object per patch, so each object is one meaningful visual token;
* a dense *alignment* loss: every projected visual token is classified against the decoder's own
  word embeddings of its colour / shape / size (``<unk>`` for an empty cell) and, through small
  throw-away heads, its row and column. Visual tokens then "speak the words" the question uses,
  so matching a question word to image regions is a plain attention lookup;
* a global loss on the vision tower's CLS token (which colour-shape pairs the scene contains), so
  CLS attention is meaningful, as in CLIP (the PruMerge / VisionZip baselines rely on it);
* a curriculum from few objects to the full scenes, and the answer-token loss only.

Scenes are drawn fresh from the world's ``train`` stream at every step (never from the
validation / test images); the data, the initialisation and the order are functions of the seed.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import world
from ..data.prompts import POST_PROMPT
from ..io import atomic_save_safetensors, atomic_write_json
from . import toy


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.01
    align_weight: float = 1.0
    curriculum_steps: int = 600  # linear curriculum: max objects grows from 3 to 8 over these steps
    adaptive_from: int = -1  # from this step on (>= 0), max objects instead grows by one (from 2)
    adaptive_threshold: float = 0.8  # whenever the last 40 steps' train accuracy reaches this
    full_from: int = -1  # from this step on (>= 0), full scenes (3-8 objects, the eval distribution)
    ground_weight: float = 0.0  # attention grounding loss (see grounding_loss)
    ground_layer: int = 3
    ground_start: int = 0  # step from which the grounding loss is on
    qk_lr_mult: float = 1.0  # learning-rate multiplier of the decoder's q/k projections
    qk_lr_from: int = 0  # step from which the multiplier applies
    suffix_weight: float = 0.0  # weight of the answer loss at every position of the prompt's suffix
    suffix_start: int = 0  # step from which that loss is on
    eval_every: int = 200
    eval_images: int = 200
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 2


ATTRS = ("color", "shape", "size")


def _attr_words(tokenizer):
    """Token ids of the words each visual token is aligned with (last entry: <unk> = empty cell)."""
    words = {"color": list(world.COLORS), "shape": list(world.SHAPES), "size": list(world.SIZES)}
    return {k: torch.tensor(tokenizer.convert_tokens_to_ids(v + ["<unk>"])) for k, v in words.items()}


def pixels(images: list) -> torch.Tensor:
    """CLIP normalisation of 192 px images; identical to the shipped CLIPImageProcessor's output
    (tests check it) but without its per-image overhead."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(toy.CLIP_MEAN)[:, None, None]
    std = torch.tensor(toy.CLIP_STD)[:, None, None]
    return (x - mean) / std


def patch_labels(scenes) -> dict:
    """Per-cell targets: attribute indices (last index = empty) and a scene-level pair bag for CLS."""
    n = world.GRID * world.GRID
    lists = {k: list(world.COLORS) if k == "color" else list(world.SHAPES) if k == "shape" else list(world.SIZES)
             for k in ATTRS}
    out = {k: torch.full((len(scenes), n), len(lists[k]), dtype=torch.long) for k in ATTRS}
    pairs = torch.zeros(len(scenes), len(world.COLORS) * len(world.SHAPES))
    for b, s in enumerate(scenes):
        for o in s.objects:
            cell = o.row * world.GRID + o.col
            for k in ATTRS:
                out[k][b, cell] = lists[k].index(getattr(o, k))
            pairs[b, lists["color"].index(o.color) * len(world.SHAPES) + lists["shape"].index(o.shape)] = 1
    out["pairs"] = pairs
    return out


def make_batch(tokenizer, rng: random.Random, batch_size: int, max_objects: int, families=world.FAMILIES):
    scenes, prompts, answers, fams, grounds = [], [], [], [], []
    n_img = 0
    while len(scenes) < batch_size:
        scene = world.make_scene(rng, f"train-stream-{n_img}", max(1, max_objects - 5), max_objects)
        n_img += 1
        family = rng.choice(families)
        got = world.question(rng, scene, family)
        if got is None:
            continue
        q, a, _, ground = got
        grounds.append(ground)
        scenes.append(scene)
        prompts.append(f"USER: {'<image>' * world.GRID ** 2}\n{q}{POST_PROMPT} ASSISTANT:")
        answers.append(a)
        fams.append(family)
    enc = tokenizer([p + " " + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True)
    # the answer token is the second last (then </s>); loss on both, so generation stops after it
    ids = enc["input_ids"]
    eos = torch.full((ids.shape[0], 1), tokenizer.eos_token_id)
    ids = torch.cat([ids, eos], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(eos)], 1)
    return scenes, ids, mask, fams, grounds


def features(model, pixel_values):
    """Projected visual tokens (B, 144, d) and the CLS state at LLaVA's feature layer."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    h = out.hidden_states[cfg.vision_feature_layer]
    return model.model.multi_modal_projector(h[:, 1:]), h[:, 0]


SUFFIX = 13  # "? answer the question using a single word or phrase . assistant :" in the toy tokenizer


class _QK:
    """Captures one decoder layer's q and k projections during the forward."""

    def __init__(self, attn):
        self.out = {}
        self.handles = [attn.q_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("q", o)),
                        attn.k_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("k", o))]


def grounding_loss(model, qk, scenes, grounds, ids, mask, pos):
    """Attention supervision: at every suffix position, head 0 (head 1) of the grounding layer
    should attend uniformly to the image tokens of the objects the question's first (second) noun
    phrase refers to, plus the BOS token as a sink (so the share left on the sink encodes the count,
    and an empty match rests on the sink). It teaches the lookup that small models fail to find by
    themselves; the heads stay ordinary Llama heads."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config.text_config
    B, T = ids.shape
    hd = cfg.hidden_size // cfg.num_attention_heads
    q = qk.out["q"].view(B, T, -1, hd).transpose(1, 2)[:, :2]
    k = qk.out["k"].view(B, T, -1, hd).transpose(1, 2)[:, :2]  # toy: no GQA, head h uses key head h
    cos, sin = model.model.language_model.rotary_emb(q, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    qs = q[:, :, T - 2 - SUFFIX:T - 2]  # "?" ... ":" (B, 2, S, hd)
    logits = qs @ k.transpose(-1, -2) / hd ** 0.5  # (B, 2, S, T)
    qpos = torch.arange(T - 2 - SUFFIX, T - 2)
    allowed = (torch.arange(T)[None, :] <= qpos[:, None])[None, None] & mask.bool()[:, None, None, :]
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    target = torch.zeros(B, 2, T)
    img = ids == model.config.image_token_index
    first_img = img.float().argmax(-1)
    bos = mask.float().argmax(-1)
    for b, (scene, ground) in enumerate(zip(scenes, grounds)):
        for h in range(2):
            cells = [scene.objects[i].row * world.GRID + scene.objects[i].col for i in ground[h]]
            target[b, h, bos[b]] = 1.0
            target[b, h, first_img[b] + torch.tensor(cells, dtype=torch.long)] = 1.0
    target = target / target.sum(-1, keepdim=True)
    return -(target[:, :, None] * logp.clamp(min=-1e4)).sum(-1).mean()


def forward_losses(model, heads, words, ids, mask, pixel_values, labels, suffix_weight: float = 0.0,
                   ground=None):
    feats, cls = features(model, pixel_values)
    emb_layer = model.get_input_embeddings()
    emb = emb_layer(ids)
    img = ids == model.config.image_token_index
    emb = emb.masked_scatter(img[..., None], feats.to(emb.dtype))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    ground_loss = grounding_loss(model, *ground, ids, mask, pos) if ground is not None else torch.zeros(())
    # the last two positions predict the answer token and </s>
    logits = model.lm_head(hidden[:, -3:-1])
    qa = F.cross_entropy(logits.flatten(0, 1), ids[:, -2:].flatten())
    answer_pred = logits[:, 0].argmax(-1) == ids[:, -2]
    if suffix_weight:
        # deep supervision along the prompt suffix: every position from the question mark on also
        # predicts the answer, so the credit path from answer to question words is a few tokens long
        early = model.lm_head(hidden[:, -2 - SUFFIX:-3])
        target = ids[:, -2:-1].expand(-1, early.shape[1])
        qa = qa + suffix_weight * F.cross_entropy(early.flatten(0, 1), target.flatten())
    # alignment: visual tokens classified against the decoder's word embeddings
    align = 0.0
    for k in ATTRS:
        table = emb_layer.weight[words[k]]  # (C, d)
        align = align + F.cross_entropy((feats @ table.T).flatten(0, 1), labels[k].flatten())
    rows = torch.arange(world.GRID).repeat_interleave(world.GRID).expand(feats.shape[0], -1)
    cols = torch.arange(world.GRID).repeat(world.GRID).expand(feats.shape[0], -1)
    align = align + F.cross_entropy(heads["row"](feats).flatten(0, 1), rows.flatten())
    align = align + F.cross_entropy(heads["col"](feats).flatten(0, 1), cols.flatten())
    align = align + F.binary_cross_entropy_with_logits(heads["cls"](cls), labels["pairs"])
    return qa, align, answer_pred, ground_loss


@torch.no_grad()
def evaluate_first_token(model, tokenizer, scenes_rows, batch_size: int = 64) -> dict:
    """Accuracy of the greedy first answer token on (scene, question row) pairs, per family.
    The toy world's answers are single words, so this equals greedy generation's exact match."""
    model.eval()
    correct: dict[str, list[int]] = {}
    for i in range(0, len(scenes_rows), batch_size):
        chunk = scenes_rows[i:i + batch_size]
        prompts = [f"USER: {'<image>' * world.GRID ** 2}\n{r['question']}{POST_PROMPT} ASSISTANT:" for _, r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        pv = pixels([world.render(s) for s, _ in chunk])
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv,
                       logits_to_keep=1).logits[:, -1]
        pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for (_, r), p in zip(chunk, pred):
            correct.setdefault(r["family"], []).append(int(p == r["answer"]))
    model.train()
    per = {f: sum(v) / len(v) for f, v in sorted(correct.items())}
    total = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return {"accuracy": total, "per_family": per}


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(out_dir: str | Path, cfg: TrainConfig, log=print) -> dict:
    """Train the toy backbone into ``out_dir`` (a from_pretrained directory), resuming from
    ``out_dir/checkpoint`` if an earlier run was interrupted. Returns the final evaluation."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    ck_dir = out_dir / "checkpoint"
    processor = toy.build_processor()
    tokenizer = processor.tokenizer
    model = toy.build_model(seed=cfg.seed).train()
    d = model.config.text_config.hidden_size
    torch.manual_seed(cfg.seed)
    heads = torch.nn.ModuleDict({"row": torch.nn.Linear(d, world.GRID), "col": torch.nn.Linear(d, world.GRID),
                                 "cls": torch.nn.Linear(model.config.vision_config.hidden_size,
                                                        len(world.COLORS) * len(world.SHAPES))})
    named = list(model.named_parameters()) + list(heads.named_parameters())
    params = [p for _, p in named]
    # attention lookups need sharp q.k logits; their projections may learn faster than the rest
    is_qk = ["language_model" in n and (".q_proj." in n or ".k_proj." in n) for n, _ in named]
    groups = [{"params": [p for (_, p), f in zip(named, is_qk) if not f], "qk": False},
              {"params": [p for (_, p), f in zip(named, is_qk) if f], "qk": True}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    params = groups[0]["params"] + groups[1]["params"]  # the optimizer's own parameter order
    names = {id(p): n for n, p in named}
    old_index = {id(p): i for i, (_, p) in enumerate(named)}
    words = _attr_words(tokenizer)
    step, level, window = 0, 2, []
    if (ck_dir / "state.json").exists():
        from safetensors.torch import load_file

        state = json.loads((ck_dir / "state.json").read_text())
        model.load_state_dict(load_file(ck_dir / "model.safetensors"), strict=False)
        heads.load_state_dict(load_file(ck_dir / "heads.safetensors"))
        opt_tensors = load_file(ck_dir / "optim.safetensors")
        osd = opt.state_dict()
        for i, p in enumerate(params):
            # the optimizer state is stored by parameter name (older checkpoints: by index in `named`)
            tag = names[id(p)] if f"{names[id(p)]}.exp_avg" in opt_tensors else str(old_index[id(p)])
            if f"{tag}.exp_avg" in opt_tensors:
                osd["state"][i] = {k: opt_tensors[f"{tag}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
        opt.load_state_dict(osd)
        step, level, window = state["step"], state.get("level", 2), state.get("window", [])
        log(f"resumed at step {step}")
    # evaluation set: validation images of the world (never the test split)
    val_scenes, val_rows = world.generate_split("validation", cfg.eval_images, seed=cfg.seed)
    by_id = {s.image_id: s for s in val_scenes}
    val = [(by_id[r["imageId"]], r) for r in val_rows]
    qk = _QK(model.model.language_model.layers[cfg.ground_layer].self_attn)
    log_path = out_dir / "train_log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    while step < cfg.steps:
        rng = random.Random(f"train/{cfg.seed}/{step}")  # the batch is a function of (seed, step): resumable
        if 0 <= cfg.full_from <= step:
            max_obj = 8
        elif 0 <= cfg.adaptive_from <= step:
            # adaptive curriculum: more objects only once the current scenes are mastered, since
            # binding words to regions is learnt on small scenes and only then transfers to crowds
            if len(window) >= 40 and sum(window[-40:]) / 40 >= cfg.adaptive_threshold and level < 8:
                level, window = level + 1, []
            max_obj = level
        else:
            max_obj = min(8, 3 + int(5 * step / max(1, cfg.curriculum_steps)))
        scenes, ids, mask, fams, grounds = make_batch(tokenizer, rng, cfg.batch_size, max_obj)
        labels = patch_labels(scenes)
        pv = pixels([world.render(s) for s in scenes])
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step) * (cfg.qk_lr_mult if g["qk"] and step >= cfg.qk_lr_from else 1.0)
        qa, align, ok, gl = forward_losses(model, heads, words, ids, mask, pv, labels,
                                           cfg.suffix_weight if step >= cfg.suffix_start else 0.0,
                                           (qk, scenes, grounds) if cfg.ground_weight and step >= cfg.ground_start else None)
        loss = qa + cfg.align_weight * align + cfg.ground_weight * gl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        window = (window + [ok.float().mean().item()])[-40:]
        rec = {"step": step, "loss": loss.item(), "qa": qa.item(), "align": float(align), "ground": float(gl), "train_acc": ok.float().mean().item(),
               "max_objects": max_obj, "lr": _lr(cfg, step - 1), "elapsed_s": round(time.time() - t0, 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["val"] = evaluate_first_token(model, tokenizer, val)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if step % 20 == 0 or "val" in rec:
            log(json.dumps(rec))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ck_dir.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(ck_dir / "model.safetensors", model.state_dict())
            atomic_save_safetensors(ck_dir / "heads.safetensors", heads.state_dict())
            ot = {}
            for i, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    ot[f"{names[id(params[i])]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            atomic_save_safetensors(ck_dir / "optim.safetensors", ot)
            atomic_write_json(ck_dir / "state.json", {"step": step, "level": level, "window": window,
                                                      "config": asdict(cfg)})
    final = evaluate_first_token(model, tokenizer, val)
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    atomic_write_json(out_dir / "training.json", {"config": asdict(cfg), "steps": step, "validation": final})
    return final
