"""The toy world: procedurally generated visual-QA scenes in GQA's schema.

A scene is a 12 x 12 grid of cells; each object sits centred in its own cell, so one object is one
visual token of the toy backbone (image 192 px, patch 16 px). Counting, comparing and relations need
objects spread over the whole grid, so a reduction that drops the wrong tokens really costs accuracy.
Everything is a pure function of a seed: the same seed gives the same scenes, questions and PNG bytes.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

GRID = 12
CELL = 16
IMAGE_SIZE = GRID * CELL
BACKGROUND = (128, 128, 128)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 14}
FAMILIES = ("attribute", "count", "exist", "relation", "compare")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = [str(i) for i in range(10)]
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    image_id: str
    objects: tuple[Obj, ...]


# ---------------------------------------------------------------- scenes and pixels

def make_scene(rng: random.Random, image_id: str, min_objects: int = 3, max_objects: int = 8) -> Scene:
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(GRID * GRID), n)
    objs = tuple(
        Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), c // GRID, c % GRID)
        for c in cells
    )
    return Scene(image_id, objs)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        s = SIZES[o.size]
        x0 = o.col * CELL + (CELL - s) // 2
        y0 = o.row * CELL + (CELL - s) // 2
        x1, y1 = x0 + s - 1, y0 + s - 1
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------- questions

def _plural(shape: str) -> str:
    return shape + "s"


def _matches(o: Obj, desc: dict) -> bool:
    return all(getattr(o, k) == v for k, v in desc.items())


def _where(scene: Scene, desc: dict) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(scene.objects) if _matches(o, desc))


def _phrase(desc: dict, plural: bool = False) -> str:
    """Noun phrase for a description, e.g. {'size': 'large', 'color': 'red'} -> 'large red object'."""
    words = [desc[k] for k in ("size", "color") if k in desc]
    noun = desc.get("shape", "object")
    words.append(_plural(noun) if plural else noun)
    return " ".join(words)


def _unique_desc(rng: random.Random, scene: Scene, obj: Obj, exclude: str | None = None) -> dict | None:
    """Shortest random description of ``obj`` (never naming ``exclude``) that no other object fits."""
    keys = [k for k in ("color", "shape", "size") if k != exclude]
    options = []
    for r in range(1, len(keys) + 1):
        for combo in _combos(keys, r):
            d = {k: getattr(obj, k) for k in combo}
            if sum(_matches(o, d) for o in scene.objects) == 1:
                options.append(d)
        if options:
            return rng.choice(options)
    return None


def _combos(keys: list[str], r: int) -> list[tuple[str, ...]]:
    from itertools import combinations

    return list(combinations(keys, r))


def _attribute(rng, scene):
    asked = rng.choice(("color", "shape", "size"))
    candidates = list(scene.objects)
    rng.shuffle(candidates)
    for obj in candidates:
        d = _unique_desc(rng, scene, obj, exclude=asked)
        if d is None:
            continue
        q = {"color": f"What color is the {_phrase(d)}?",
             "shape": f"What shape is the {_phrase(d)}?",
             "size": f"What size is the {_phrase(d)}?"}[asked]
        i = scene.objects.index(obj)
        return q, getattr(obj, asked), f"attribute-{asked}", ((i,), (i,))
    return None


def _random_desc(rng, scene, present: bool | None = None) -> dict:
    """A description of one or two attributes; if ``present`` is set, drawn so that it (does not) match."""
    for _ in range(50):
        if present:
            o = rng.choice(scene.objects)
            keys = rng.choice((("color",), ("shape",), ("color", "shape"), ("size", "shape"), ("size", "color")))
            return {k: getattr(o, k) for k in keys}
        keys = rng.choice((("color",), ("shape",), ("color", "shape"), ("size", "shape"), ("size", "color")))
        pools = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
        d = {k: rng.choice(pools[k]) for k in keys}
        if present is None or not any(_matches(o, d) for o in scene.objects):
            return d
    return d


def _count(rng, scene):
    d = _random_desc(rng, scene, present=rng.random() < 0.8)
    hits = _where(scene, d)
    return f"How many {_phrase(d, plural=True)} are there?", str(len(hits)), "count", (hits, hits)


def _exist(rng, scene):
    want = rng.random() < 0.5
    d = _random_desc(rng, scene, present=want)
    hits = _where(scene, d)
    return f"Is there a {_phrase(d)}?", "yes" if hits else "no", "exist", (hits, hits)


def _relation(rng, scene):
    objs = list(scene.objects)
    if len(objs) < 2:
        return None
    for _ in range(30):
        a, b = rng.sample(objs, 2)
        rel = rng.choice(RELATIONS)
        horizontal = rel in ("left of", "right of")
        if (horizontal and a.col == b.col) or (not horizontal and a.row == b.row):
            continue
        da, db = _unique_desc(rng, scene, a), _unique_desc(rng, scene, b)
        if da is None or db is None:
            continue
        truth = {"left of": a.col < b.col, "right of": a.col > b.col,
                 "above": a.row < b.row, "below": a.row > b.row}[rel]
        ia, ib = objs.index(a), objs.index(b)
        return (f"Is the {_phrase(da)} {rel} the {_phrase(db)}?", "yes" if truth else "no", "relation",
                ((ia,), (ib,)))
    return None


def _compare(rng, scene):
    for _ in range(30):
        kind = rng.choice(("color", "shape"))
        pool = list(COLORS) if kind == "color" else list(SHAPES)
        x, y = rng.sample(pool, 2)
        nx = sum(getattr(o, kind) == x for o in scene.objects)
        ny = sum(getattr(o, kind) == y for o in scene.objects)
        if nx == ny:
            continue
        px = _phrase({kind: x}, plural=True)
        py = _phrase({kind: y}, plural=True)
        gx, gy = _where(scene, {kind: x}), _where(scene, {kind: y})
        return f"Are there more {px} than {py}?", "yes" if nx > ny else "no", "compare", (gx, gy)
    return None


_FAMILY_FN = {"attribute": _attribute, "count": _count, "exist": _exist,
              "relation": _relation, "compare": _compare}


def question(rng: random.Random, scene: Scene, family: str):
    """One ``(question, answer, detailed_type, grounding)`` of ``family`` about ``scene``, or None
    if the scene cannot support it (e.g. no uniquely described object). ``grounding`` holds the
    indices of the objects each of the question's (one or two) noun phrases refers to."""
    return _FAMILY_FN[family](rng, scene)


# ---------------------------------------------------------------- the data set in GQA's schema

def generate_split(split: str, n_images: int, seed: int = 0, min_objects: int = 3, max_objects: int = 8,
                   families: tuple[str, ...] = FAMILIES):
    """Scenes and question rows for one split. Image ids carry the split name, so splits are disjoint.

    Returns ``(scenes, rows)``; each row has GQA's columns (``id``, ``imageId``, ``question``,
    ``answer``, ``fullAnswer``, ``types``) plus ``family``."""
    rng = random.Random(f"diffopsearch-world/{seed}/{split}")
    scenes, rows = [], []
    for i in range(n_images):
        scene = make_scene(rng, f"{split}-{i:06d}", min_objects, max_objects)
        scenes.append(scene)
        for family in families:
            got = question(rng, scene, family)
            if got is None:
                continue
            q, a, detailed, _ = got
            rows.append({
                "id": f"{scene.image_id}-{family}",
                "imageId": scene.image_id,
                "question": q,
                "answer": a,
                "fullAnswer": a,
                "family": family,
                "types": {"structural": family, "semantic": family, "detailed": detailed},
            })
    return scenes, rows


def vocabulary() -> list[str]:
    """Every word the world can produce (questions and answers), lower-cased."""
    words = set(COLORS) | set(SHAPES) | set(SIZES) | {_plural(s) for s in SHAPES} | set(NUMBER_WORDS)
    words |= set("what color shape size is the how many are there a more than yes no of object objects".split())
    for r in RELATIONS:
        words |= set(r.split())
    return sorted(words)


DEFAULT_SPLIT_SIZES = {"train": 2000, "validation": 400, "test": 1000}


def write_world(out_dir, seed: int = 0, sizes: dict | None = None) -> None:
    """Write the world as a local data set laid out like lmms-eval's GQA on the hub: two configs,
    ``instructions`` (questions) and ``images``, parquet files per split, and a README whose YAML
    header declares the configs, so ``datasets.load_dataset(out_dir, config, split=...)`` reads it
    with the very code path that reads the hub data set. Written to a temporary folder first and
    renamed, so a half-written world is never mistaken for a finished one."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import datasets

    sizes = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        q_feats = datasets.Features({
            "id": datasets.Value("string"), "imageId": datasets.Value("string"),
            "question": datasets.Value("string"), "answer": datasets.Value("string"),
            "fullAnswer": datasets.Value("string"), "family": datasets.Value("string"),
            "types": {"structural": datasets.Value("string"), "semantic": datasets.Value("string"),
                      "detailed": datasets.Value("string")},
        })
        i_feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
        for split, n in sizes.items():
            scenes, rows = generate_split(split, n, seed)
            (tmp / "instructions").mkdir(exist_ok=True)
            (tmp / "images").mkdir(exist_ok=True)
            datasets.Dataset.from_list(rows, features=q_feats).to_parquet(
                str(tmp / "instructions" / f"{split}-00000-of-00001.parquet"))
            images = [{"id": s.image_id, "image": {"bytes": png_bytes(render(s)), "path": None}} for s in scenes]
            datasets.Dataset.from_list(images, features=i_feats).to_parquet(
                str(tmp / "images" / f"{split}-00000-of-00001.parquet"))
        configs = "\n".join(
            f"- config_name: {cfg}\n  data_files:\n" + "".join(
                f"  - split: {s}\n    path: {cfg}/{s}-*.parquet\n" for s in sizes)
            for cfg in ("instructions", "images"))
        (tmp / "README.md").write_text(
            f"---\nconfigs:\n{configs}---\n# diffopsearch toy world\n\n"
            f"Generated by `diffopsearch.data.world.write_world(seed={seed})`; GQA's schema.\n")
        (tmp / "world.json").write_text(json.dumps({"seed": seed, "sizes": sizes, "grid": GRID,
                                                    "image_size": IMAGE_SIZE}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
