"""Training recipe of the shipped toy backbone (scripts/train_toy.py runs it).

Why it looks like this (docs/DESIGN.md section 6: a small LLaVA trained from scratch on 2 cores tends to
sit at the answer prior, because binding question words to image regions is hard):

* one object per patch, so each object is one meaningful visual token;
* many questions per image in one sequence (:func:`make_batch`): each question branch attends to
  the shared image prefix and to itself only, with the positions a single prompt would have, so
  the image and its prefix are computed once for 16 supervised answers (about 5x the answers per
  second of one question per sequence), and each branch is exactly the evaluation prompt;
* a dense *alignment* loss: every projected visual token is classified against the decoder's own
  word embeddings of its colour / shape / size (``<unk>`` for an empty cell) and, through small
  throw-away heads, its row and column. Visual tokens then "speak the words" the question uses;
* attention *grounding* (:func:`attention_loss`, :func:`forward_losses`): a small circuit is
  taught head by head. At each noun of the question, heads 0/1 of layer 0 gather the words of its
  noun phrase ("large red square") and heads 0/1 of layer 1 attend to the objects that phrase
  describes (plus BOS as a sink); at the answer position, heads 0/1 of layer 2 read the first /
  second noun and heads 0/1 of layer 3 attend to the objects again. Without any of it the answer
  position spread its attention evenly over the 144 tokens (measured: still at the answer prior
  after 760 packed steps); with the lookups alone (no phrase / route heads) the noun's query lacked
  its modifiers and found the referent of an attribute question first only 44% of the time;
* bfloat16 autocast on the CPU (weights and optimizer state stay float32): about 1.4x the steps per
  second of float32 on these 2 cores;
* a global loss on the vision tower's CLS token (which colour-shape pairs the scene contains), so
  CLS attention is meaningful, as in CLIP (the PruMerge / VisionZip baselines rely on it);
* a curriculum from few objects to the full scenes, and the answer-token loss only;
* relation *probes* (:func:`relation_loss`, a later phase started from the first one's weights
  with ``--init``): after the answer lookup, linear heads read both referents' rows / columns,
  their order and the relation asked off the answer position, and relation questions weigh more
  in the answer loss (``relation_qa``). Without them relation stayed at chance for 4500 steps
  while the lookups found both objects: the information the comparison needs never reached the
  answer position together.

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
    steps: int = 5000
    images: int = 8  # images per step
    questions: int = 16  # questions per image, all sharing its prefix (see make_batch)
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.01
    align_weight: float = 1.0
    curriculum_steps: int = 600  # max objects per scene grows linearly from 3 to 8 over these steps
    ground_weight: float = 2.0  # attention grounding loss (see attention_loss); 0 = off
    noun_layer: int = 1  # the layer whose heads 0/1 are grounded at the noun phrases' nouns
    answer_layer: int = 3  # the layer whose heads 0/1 are grounded at the answer position
    phrase_layer: int = 0  # the layer whose heads 0/1 gather each noun phrase's words at its noun; -1 = off
    route_layer: int = 2  # the layer whose heads 0/1 read the first / second noun at the answer; -1 = off
    bf16: int = 1  # bfloat16 autocast (weights stay float32): about 1.4x the steps per second on a CPU
    relation_weight: float = 0.0  # position probes at the answer after answer_layer (see relation_loss); 0 = off
    relation_qa: float = 1.0  # weight of the relation questions' answer loss (the others: 1)
    init: str = ""  # start from this run directory's checkpoint (model and heads; a fresh optimizer)
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


@dataclass
class Batch:
    """``images`` scenes, each followed by up to ``questions`` question branches that all attend to
    the scene's prefix (``<s> USER: <image>...``) and, causally, to themselves only: every branch
    sees exactly the single-question prompt the evaluation uses (same tokens, same positions), while
    the image is encoded and its prefix computed once for all of them."""

    scenes: list
    ids: torch.Tensor     # (B, T) right-padded
    mask: torch.Tensor    # (B, 1, T, T) bool, True = may attend
    pos: torch.Tensor     # (B, T) position ids (each branch restarts after the prefix)
    row: torch.Tensor     # (N,) the scene of each question
    answer: torch.Tensor  # (N,) index of each answer token (then </s>)
    nouns: torch.Tensor   # (N, 2) index of the noun ending the question's first / second noun phrase
    phrases: list         # (N, 2) the indices of each noun phrase's words (its modifiers and noun)
    ground: list          # (N,) the object indices each noun phrase refers to
    families: list        # (N,)
    relations: list       # (N,) index into world.RELATIONS of a relation question's relation, else -1


NOUNS = set(world.SHAPES) | {s + "s" for s in world.SHAPES} | {"object", "objects"}
MODIFIERS = set(world.COLORS) | set(world.SIZES)


def make_batch(tokenizer, rng: random.Random, images: int, questions: int, max_objects: int) -> Batch:
    prefix = tokenizer(f"USER: {'<image>' * world.GRID ** 2}\n")["input_ids"]
    P = len(prefix)
    nouns = set(tokenizer.convert_tokens_to_ids(sorted(NOUNS)))
    modifiers = set(tokenizer.convert_tokens_to_ids(sorted(MODIFIERS)))
    scenes, seqs, segs, poss = [], [], [], []
    row, answer, noun_at, ground, fams, phrases, rels = [], [], [], [], [], [], []
    while len(scenes) < images:
        scene = world.make_scene(rng, "train-stream", max(1, max_objects - 5), max_objects)
        ids, seg, pos, n = list(prefix), [0] * P, list(range(P)), 0
        for j in range(questions):
            # every family in turn, so each scene is asked a balanced mix
            family = world.FAMILIES[j % len(world.FAMILIES)]
            got = world.question(rng, scene, family)
            if got is None:
                continue
            q, a, _, g = got
            # word-level tokenizer: the question's tokens then the rest's are the whole branch's
            question_ids = tokenizer(q, add_special_tokens=False)["input_ids"]
            rest = tokenizer(f"{POST_PROMPT} ASSISTANT: {a}", add_special_tokens=False)["input_ids"]
            branch = question_ids + rest + [tokenizer.eos_token_id]
            at = [i for i, t in enumerate(question_ids) if t in nouns]  # not the answer (it may be a shape)
            noun_at.append((len(ids) + at[0], len(ids) + at[-1]))
            spans = []
            for j in (at[0], at[-1]):  # a phrase = the run of modifiers before its noun, and the noun
                start = j
                while start > 0 and question_ids[start - 1] in modifiers:
                    start -= 1
                spans.append([len(ids) + i for i in range(start, j + 1)])
            phrases.append(spans)
            answer.append(len(ids) + len(branch) - 2)
            row.append(len(scenes))
            ground.append(g)
            fams.append(family)
            rels.append(next((i for i, w in enumerate(world.RELATIONS) if f" {w} " in q), -1)
                        if family == "relation" else -1)
            n += 1
            ids += branch
            seg += [n] * len(branch)
            pos += range(P, P + len(branch))
        if n:
            scenes.append(scene)
            seqs.append(ids)
            segs.append(seg)
            poss.append(pos)
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
    seg = torch.full((len(seqs), T), -1)
    pos = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, (i, s, p) in enumerate(zip(seqs, segs, poss)):
        ids[b, :len(i)], seg[b, :len(s)], pos[b, :len(p)] = torch.tensor(i), torch.tensor(s), torch.tensor(p)
    t = torch.arange(T)
    causal = t[None, :] <= t[:, None]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # the prefix, or the own branch
    mask = causal[None] & same & (seg >= 0)[:, None, :]
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding rows attend to themselves (no empty softmax)
    return Batch(scenes, ids, mask[:, None], pos, torch.tensor(row), torch.tensor(answer),
                 torch.tensor(noun_at), phrases, ground, fams, rels)


def features(model, pixel_values):
    """Projected visual tokens (B, 144, d) and the CLS state at LLaVA's feature layer."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    h = out.hidden_states[cfg.vision_feature_layer]
    return model.model.multi_modal_projector(h[:, 1:]), h[:, 0]


class _QK:
    """Captures one decoder layer's q and k projections during the forward."""

    def __init__(self, attn):
        self.out = {}
        self.handles = [attn.q_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("q", o)),
                        attn.k_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("k", o))]


def attention_loss(model, qk: _QK, batch: Batch, at: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Attention supervision: at query positions ``at`` (N, 2), head 0 (head 1) of the captured layer
    should attend with the distribution ``target[:, 0]`` (``target[:, 1]``) over the sequence (N, 2, T).
    It teaches the lookups that small models trained from scratch fail to find by themselves (docs/DESIGN.md
    section 6); the heads stay ordinary Llama heads, so nothing of this is needed at inference."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config.text_config
    B, T = batch.ids.shape
    hd = cfg.hidden_size // cfg.num_attention_heads
    q = qk.out["q"].float().view(B, T, -1, hd).transpose(1, 2)[:, :2]
    k = qk.out["k"].float().view(B, T, -1, hd).transpose(1, 2)[:, :2]  # toy: no GQA, head h uses key head h
    cos, sin = model.model.language_model.rotary_emb(q, batch.pos)
    q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    N = len(batch.row)
    heads = torch.arange(2).expand(N, 2)
    rows = batch.row[:, None].expand(N, 2)
    qs = q[rows, heads, at]                                   # (N, 2, hd)
    logits = (qs[:, :, None] * k[rows, heads]).sum(-1) / hd ** 0.5  # (N, 2, T)
    allowed = batch.mask[rows, 0, at]                          # (N, 2, T)
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    target = target / target.sum(-1, keepdim=True)
    return -(target * logp.clamp(min=-1e4)).sum(-1).mean()


def object_targets(batch: Batch, first_img: int) -> torch.Tensor:
    """(N, 2, T): the image tokens of the objects each noun phrase refers to, plus the BOS token as a
    sink (so the share left on the sink encodes the count, and an empty match rests on the sink)."""
    N, T = len(batch.row), batch.ids.shape[1]
    target = torch.zeros(N, 2, T)
    target[:, :, 0] = 1.0
    for n, g in enumerate(batch.ground):
        scene = batch.scenes[int(batch.row[n])]
        for h in range(2):
            cells = [first_img + scene.objects[i].row * world.GRID + scene.objects[i].col for i in g[h]]
            target[n, h, cells] = 1.0
    return target


def position_targets(batch: Batch, positions) -> torch.Tensor:
    """(N, 2, T): uniform over ``positions[n][h]`` (a list of sequence indices) for head h."""
    N, T = len(batch.row), batch.ids.shape[1]
    target = torch.zeros(N, 2, T)
    for n, per_head in enumerate(positions):
        for h, where in enumerate(per_head):
            target[n, h, where] = 1.0
    return target


def aux_heads(model) -> torch.nn.ModuleDict:
    """The throw-away heads of the alignment loss: row and column of each visual token, and the
    scene's colour-shape pairs from the CLS state. Trained with the model, never saved with it."""
    d = model.config.text_config.hidden_size
    return torch.nn.ModuleDict({"row": torch.nn.Linear(d, world.GRID), "col": torch.nn.Linear(d, world.GRID),
                                "cls": torch.nn.Linear(model.config.vision_config.hidden_size,
                                                       len(world.COLORS) * len(world.SHAPES)),
                                # relation probes: both referents' row / column, and their order on each axis
                                "where": torch.nn.Linear(d, 4 * world.GRID), "order": torch.nn.Linear(d, 2 * 3),
                                "relation": torch.nn.Linear(d, len(world.RELATIONS))})


def relation_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the relation questions of ``batch``: their indices, the (row, col) of the first and second
    referent (R, 4) and the classes of the sign of (first - second) on rows and columns (0/1/2) and
    of the relation asked (R, 3)."""
    idx, where = [], []
    for n, f in enumerate(batch.families):
        if f == "relation":
            scene = batch.scenes[int(batch.row[n])]
            a, b = (scene.objects[batch.ground[n][h][0]] for h in range(2))
            idx.append(n)
            where.append([a.row, a.col, b.row, b.col])
    where = torch.tensor(where, dtype=torch.long).view(-1, 4)
    order = torch.sign(where[:, :2] - where[:, 2:]).long() + 1
    order = torch.cat([order, torch.tensor([batch.relations[n] for n in idx], dtype=torch.long)[:, None]], 1)
    return torch.tensor(idx, dtype=torch.long), where, order


def relation_loss(heads, state: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Probes on the answer position's state after the answer lookup (``state``: (N, d)): the rows /
    columns of a relation question's two referents, their order and the relation asked. The plain
    answer loss never taught it (relation stayed at chance while the lookups found both objects):
    the lookups' values did not carry position. The probes put everything the answer depends on
    at the answer position; the answer loss then learns the comparison."""
    idx, where, order = relation_targets(batch)
    if not len(idx):
        return torch.zeros(())
    h = state[idx].float()
    loss = F.cross_entropy(heads["where"](h).view(-1, world.GRID), where.flatten())
    loss = loss + F.cross_entropy(heads["order"](h).view(-1, 3), order[:, :2].flatten())
    return loss + F.cross_entropy(heads["relation"](h), order[:, 2])


def forward_losses(model, heads, words, batch: Batch, pixel_values, labels, ground=None, probe_layer=None,
                   relation_qa: float = 1.0):
    """Answer loss (answer token and </s>), the alignment loss and, given ``ground`` (layer name ->
    q/k capture), the attention losses of the circuit the toy backbone is taught:

    * ``phrase``: at each noun, heads 0/1 gather the words of its noun phrase ("large red square");
    * ``noun``: at each noun, heads 0/1 look up the objects that phrase describes (plus BOS);
    * ``route``: at the answer position, heads 0/1 read the first / second noun;
    * ``answer``: at the answer position, heads 0/1 look up the objects again.

    Given ``probe_layer``, also returns :func:`relation_loss` on the answer position's state after
    that layer (else zero)."""
    feats, cls = features(model, pixel_values)
    emb_layer = model.get_input_embeddings()
    img = batch.ids == model.config.image_token_index
    emb = emb_layer(batch.ids)
    emb = emb.masked_scatter(img[..., None], feats.to(emb.dtype))
    out = model.model.language_model(inputs_embeds=emb, attention_mask=batch.mask, position_ids=batch.pos,
                                     output_hidden_states=probe_layer is not None)
    hidden = out.last_hidden_state
    r, a = batch.row, batch.answer
    rel = torch.zeros(())
    if probe_layer is not None:
        rel = relation_loss(heads, out.hidden_states[probe_layer + 1][r, a - 1], batch)
    logits = model.lm_head(torch.stack([hidden[r, a - 1], hidden[r, a]], 1))  # predict the answer, </s>
    target = torch.stack([batch.ids[r, a], batch.ids[r, a + 1]], 1)
    w = torch.tensor([relation_qa if f == "relation" else 1.0 for f in batch.families])
    qa = (F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(-1, 2).mean(1) * w).mean()
    ok = logits[:, 0].argmax(-1) == target[:, 0]
    gl = torch.zeros(())
    if ground:
        first_img = int(img[0].float().argmax())
        objects = object_targets(batch, first_img)
        at_answer = (a - 1)[:, None].expand(-1, 2)
        targets = {"phrase": (batch.nouns, position_targets(batch, batch.phrases)),
                   "noun": (batch.nouns, objects),
                   "route": (at_answer, position_targets(batch, batch.nouns[:, :, None].tolist())),
                   "answer": (at_answer, objects)}
        for name, qk in ground.items():
            gl = gl + attention_loss(model, qk, batch, *targets[name])
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
    return qa, align, ok, gl, rel


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


# The training recipe reads top to bottom as one screen (data, model, optimiser, loop, checkpoints), as
# nanoGPT's train.py does.
def train(out_dir: str | Path, cfg: TrainConfig, log=print) -> dict:
    """Train the toy backbone into ``out_dir`` (a from_pretrained directory), resuming from
    ``out_dir/checkpoint`` if an earlier run was interrupted. Returns the final evaluation."""
    from safetensors.torch import load_file

    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    ck_dir = out_dir / "checkpoint"
    processor = toy.build_processor()
    tokenizer = processor.tokenizer
    model = toy.build_model(seed=cfg.seed).train()
    torch.manual_seed(cfg.seed)
    heads = aux_heads(model)
    named = list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in heads.named_parameters()]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    words = _attr_words(tokenizer)
    step = 0
    if cfg.init and not (ck_dir / "state.json").exists():
        init = Path(cfg.init) / "checkpoint"
        model.load_state_dict(load_file(init / "model.safetensors"), strict=False)
        heads.load_state_dict(load_file(init / "heads.safetensors"), strict=False)  # new probes start fresh
        log(f"initialised from {init}")
    if (ck_dir / "state.json").exists():
        model.load_state_dict(load_file(ck_dir / "model.safetensors"), strict=False)
        heads.load_state_dict(load_file(ck_dir / "heads.safetensors"))
        saved = load_file(ck_dir / "optim.safetensors")  # optimizer state by parameter name
        osd = opt.state_dict()
        for i, (n, _) in enumerate(named):
            if f"{n}.exp_avg" in saved:
                osd["state"][i] = {k: saved[f"{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
        opt.load_state_dict(osd)
        step = json.loads((ck_dir / "state.json").read_text())["step"]
        log(f"resumed at step {step}")
    # evaluation set: validation images of the world (never the test split)
    val_scenes, val_rows = world.generate_split("validation", cfg.eval_images, seed=cfg.seed)
    by_id = {s.image_id: s for s in val_scenes}
    val = [(by_id[r["imageId"]], r) for r in val_rows]
    layers = model.model.language_model.layers
    ground = {name: _QK(layers[i].self_attn) for name, i in
              (("phrase", cfg.phrase_layer), ("noun", cfg.noun_layer), ("route", cfg.route_layer),
               ("answer", cfg.answer_layer)) if i >= 0}
    log_path = out_dir / "train_log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    while step < cfg.steps:
        rng = random.Random(f"train/{cfg.seed}/{step}")  # the batch is a function of (seed, step): resumable
        max_obj = min(8, 3 + int(5 * step / max(1, cfg.curriculum_steps)))
        batch = make_batch(tokenizer, rng, cfg.images, cfg.questions, max_obj)
        pv = pixels([world.render(s) for s in batch.scenes])
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.bf16)):
            qa, align, ok, gl, rel = forward_losses(
                model, heads, words, batch, pv, patch_labels(batch.scenes), ground if cfg.ground_weight else None,
                cfg.answer_layer if cfg.relation_weight else None, cfg.relation_qa)
        loss = qa + cfg.align_weight * align + cfg.ground_weight * gl + cfg.relation_weight * rel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        per = {}
        for f, o in zip(batch.families, ok.tolist()):
            per.setdefault(f, []).append(o)
        rec = {"step": step, "loss": loss.item(), "qa": qa.item(), "align": float(align), "ground": float(gl),
               "relation": float(rel),
               "train_acc": ok.float().mean().item(), "train_per_family": {f: sum(v) / len(v) for f, v in per.items()},
               "max_objects": max_obj, "lr": _lr(cfg, step - 1), "elapsed_s": round(time.time() - t0, 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["val"] = evaluate_first_token(model, tokenizer, val)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if step % 20 == 0 or "val" in rec:
            log(json.dumps({k: v for k, v in rec.items() if k != "train_per_family"}))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ck_dir.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(ck_dir / "model.safetensors", model.state_dict())
            atomic_save_safetensors(ck_dir / "heads.safetensors", heads.state_dict())
            by_index = dict(enumerate(n for n, _ in named))
            atomic_save_safetensors(ck_dir / "optim.safetensors", {
                f"{by_index[i]}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
                for i, st in opt.state_dict()["state"].items() for k, v in st.items()})
            atomic_write_json(ck_dir / "state.json", {"step": step, "config": asdict(cfg)})
    final = evaluate_first_token(model, tokenizer, val)
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    atomic_write_json(out_dir / "training.json", {"config": asdict(cfg), "steps": step, "validation": final})
    return final
