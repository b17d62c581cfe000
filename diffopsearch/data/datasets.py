"""Question / image data for evaluation and search: GQA, VQAv2 and the toy world, through `datasets`.

The same code reads the hub data sets and local copies or fixtures of them:

- **GQA** (lmms-eval's ``lmms-lab-encoder/GQA``, formerly ``lmms-lab/GQA``): two configs, questions
  (``testdev_balanced_instructions``: ``id``, ``imageId``, ``question``, ``answer``, ``fullAnswer``,
  ``types`` {structural, semantic, detailed}, ...) and images (``testdev_balanced_images``: ``id``,
  ``image``), split ``testdev``, joined on ``imageId`` -> ``id``.
- **toy world**: GQA's layout with configs ``instructions`` / ``images``, splits train / validation /
  test, plus a ``family`` column (:mod:`diffopsearch.data.world`).
- **VQAv2** (lmms-eval's ``lmms-lab-encoder/VQAv2``): one config, split ``validation``, columns
  ``question_id``, ``question``, ``answers`` (10 dicts ``answer``, ``answer_confidence``,
  ``answer_id``), ``multiple_choice_answer``, ``answer_type``, ``question_type``, ``image_id`` and the
  ``image`` inline.

Images are never all decoded: the image column is read undecoded (bytes) and each batch decodes
only its own images. A broken image is reported (``QADataset.image_errors``) and its question
skipped, not fatal.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError

# Defaults per data set name; any of them can be overridden from the config.
DEFAULTS = {
    "gqa": dict(path="lmms-lab-encoder/GQA", questions_config="testdev_balanced_instructions",
                images_config="testdev_balanced_images", split="testdev", metric="gqa"),
    "vqav2": dict(path="lmms-lab-encoder/VQAv2", questions_config=None, images_config=None,
                  split="validation", metric="vqa"),
    "toy": dict(path="", questions_config="instructions", images_config="images", split="test", metric="gqa"),
}
GQA_QUESTION_COLUMNS = ("id", "imageId", "question", "answer")
GQA_IMAGE_COLUMNS = ("id", "image")
VQA_COLUMNS = ("question_id", "question", "answers", "image")
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- loading

def local_cache_dir(path: Path) -> str:
    """A `datasets` cache folder private to one local data set *and its current files*.

    `datasets` 5 names the Arrow cache of a local folder after the folder's base name and config
    only, so two different folders called e.g. ``world`` (or a regenerated world) would silently
    share one stale cache. Fingerprinting the absolute path and every file's size and mtime avoids it.
    """
    import datasets

    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "diffopsearch-local" / h.hexdigest()[:16])


def _load_split(path: str, config: str | None, split: str, what: str):
    """``datasets.load_dataset(path, config, split=split)`` with user-facing errors."""
    import datasets

    kwargs = {}
    local = Path(path).expanduser()
    if local.is_dir():
        path = str(local)
        kwargs["cache_dir"] = local_cache_dir(local)
    elif path.startswith((".", "/", "~")):
        raise UserError(f"dataset.path {path!r} does not exist: give a Hugging Face dataset id "
                        f"(e.g. {DEFAULTS['gqa']['path']}) or a local folder laid out like it.")
    try:
        return datasets.load_dataset(path, config, split=split, **kwargs)
    except UserError:
        raise
    except Exception as e:  # datasets raises ValueError/FileNotFoundError/hub errors for bad ids, configs, splits
        cfg = f" config {config!r}" if config else ""
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if "BatchSize must be greater than 0" in str(root):  # datasets 5 fails on a parquet file of 0 rows
            raise _empty_split(path, config, split) from None
        cause = f" ({type(root).__name__}: {root})" if root is not e else ""
        raise UserError(f"could not load the {what} of dataset {path!r}{cfg} split {split!r}: {e}{cause} "
                        "Check dataset.path, dataset.questions_config / images_config and dataset.split "
                        "(GQA: testdev_balanced_instructions / testdev_balanced_images, split testdev; "
                        "VQAv2: split validation; toy: instructions / images, splits train/validation/test).") from e


def _require(ds, columns: Sequence[str], what: str, schema: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"{what} has no column {missing[0]!r} (columns found: {', '.join(ds.column_names)}). "
                        f"{schema}")


def _empty_split(path: str, config: str | None, split: str) -> UserError:
    cfg = f" config {config!r}" if config else ""
    return UserError(f"split {split!r} of dataset {path!r}{cfg} has no questions: choose a split (or a row "
                     "range such as 'test[:1000]') that holds some, with dataset.split / dataset.search_split.")


def _non_empty(ds, path: str, config: str | None, split: str) -> None:
    if len(ds) == 0:
        raise _empty_split(path, config, split)


GQA_SCHEMA = ("The GQA schema (lmms-eval's lmms-lab-encoder/GQA, also the toy world's) needs a questions config "
              "with columns id, imageId, question, answer and an images config with columns id, image, "
              "joined on imageId -> id.")
VQA_SCHEMA = ("The VQAv2 schema (lmms-eval's lmms-lab-encoder/VQAv2) needs columns question_id, question, answers "
              "(the 10 annotator answers, dicts with an 'answer' key) and image.")


def load_qa(name: str, path: str | None = None, split: str | None = None, questions_config: str | None = None,
            images_config: str | None = None, limit: int | None = None) -> "QADataset":
    """Load ``name`` (gqa | vqav2 | toy) from ``path`` (hub id or local folder; defaults per name).

    ``limit``: keep the first N questions (in the data set's order)."""
    import datasets

    if name not in DEFAULTS:
        raise UserError(f"dataset.name {name!r} is not valid: use one of {', '.join(DEFAULTS)}.")
    d = DEFAULTS[name]
    path = path or d["path"]
    if not path:
        from ..backbone.load import prepare_world

        path = str(prepare_world())
    split = split or d["split"]
    questions_config = questions_config or d["questions_config"]
    if limit is not None and limit <= 0:
        raise UserError(f"limit {limit!r} is not valid: give a positive number of questions, or null for all.")

    if name == "vqav2":
        q = _load_split(path, questions_config, split, "questions")
        _require(q, VQA_COLUMNS, f"dataset {path!r} (split {split!r})", VQA_SCHEMA)
        _non_empty(q, path, questions_config, split)
        if limit is not None and limit < len(q):
            q = q.select(range(limit))
        q = q.cast_column("image", datasets.Image(decode=False))
        return QADataset(name=name, path=path, split=split, metric=d["metric"], questions=q, images=None,
                         id_column="question_id", image_key_column=None)

    images_config = images_config or d["images_config"]
    q = _load_split(path, questions_config, split, "questions")
    _require(q, GQA_QUESTION_COLUMNS, f"questions config {questions_config!r} of {path!r}", GQA_SCHEMA)
    _non_empty(q, path, questions_config, split)
    # The images config holds every image of the split: a slice ("testdev[:100]") applies to questions only.
    im = _load_split(path, images_config, split.split("[")[0], "images")
    _require(im, GQA_IMAGE_COLUMNS, f"images config {images_config!r} of {path!r}", GQA_SCHEMA)
    if limit is not None and limit < len(q):
        q = q.select(range(limit))
    im = im.cast_column("image", datasets.Image(decode=False))
    return QADataset(name=name, path=path, split=split, metric=d["metric"], questions=q, images=im,
                     id_column="id", image_key_column="imageId")


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def splits_overlap(a: str, b: str) -> bool:
    """Whether two split specs in HF slice syntax (``val``, ``validation[:4000]``,
    ``validation[4000:]``) may share questions. Only two absolute row ranges of the same split are
    known to be disjoint without loading it; anything else of the same split counts as overlapping."""
    import re

    def parse(s):  # -> (split name, absolute row range or None when unknown / the whole split)
        m = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", s)
        if not m:
            return s, None
        name, lo, hi = m.groups()
        if lo is None or lo.startswith("-") or hi.startswith("-"):  # negative: relative to the end
            return name, None
        return name, (int(lo or 0), int(hi) if hi else float("inf"))

    (na, ra), (nb, rb) = parse(a), parse(b)
    if na != nb:
        return False
    if ra is None or rb is None:
        return True
    return max(ra[0], rb[0]) < min(ra[1], rb[1])


def load_from_config(dataset_cfg, split: str | None = None, limit: int | None = None,
                     search: bool = False) -> "QADataset":
    """A :class:`QADataset` from ``cfg.dataset`` (name, path, questions_config, images_config, split).

    ``split`` overrides ``dataset_cfg.split`` (the search passes ``search_split``);
    ``search=True`` prefers ``search_questions_config`` / ``search_images_config`` where set (GQA
    keeps its train / val questions in other configs than testdev)."""
    qc, ic = _get(dataset_cfg, "questions_config"), _get(dataset_cfg, "images_config")
    if search:
        qc = _get(dataset_cfg, "search_questions_config") or qc
        ic = _get(dataset_cfg, "search_images_config") or ic
    return load_qa(_get(dataset_cfg, "name", "toy"), _get(dataset_cfg, "path") or None,
                   split or _get(dataset_cfg, "split"), qc, ic, limit)


# ---------------------------------------------------------------- the data set object

def decode_image(value) -> Any:
    """An undecoded `datasets.Image` value ({'bytes', 'path'}) -> RGB PIL image. Raises on failure."""
    from PIL import Image

    if value is None:
        raise ValueError("no image")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data, path = value.get("bytes"), value.get("path")
    img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    img.load()
    return img.convert("RGB")


def _question_type(row: dict) -> str | None:
    """Per-type breakdown key: toy ``family``; GQA ``types.structural``; VQAv2 ``answer_type``."""
    if row.get("family"):
        return row["family"]
    types = row.get("types")
    if isinstance(types, dict) and types.get("structural"):
        return types["structural"]
    return row.get("answer_type") or None


@dataclass
class QADataset:
    """One split of a QA data set. Rows are addressed by position ``0 .. len-1``."""

    name: str
    path: str
    split: str
    metric: str  # gqa | vqa
    questions: Any  # datasets.Dataset (VQAv2: with the undecoded image column)
    images: Any  # datasets.Dataset of (id, image) for GQA-style data, None for VQAv2
    id_column: str
    image_key_column: str | None
    image_errors: dict = field(default_factory=dict)  # question id -> reason
    _image_index: dict | None = None
    _ids: list | None = None

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def ids(self) -> list[str]:
        """Question ids as strings (VQAv2's integer ids included), in row order."""
        if self._ids is None:
            self._ids = [str(i) for i in self.questions[self.id_column]]
        return self._ids

    def _meta_columns(self) -> list[str]:
        wanted = [self.id_column, "question", "answer", "answers", "family", "types", "answer_type",
                  "question_type", "multiple_choice_answer"]
        if self.image_key_column:
            wanted.append(self.image_key_column)
        return [c for c in wanted if c in self.questions.column_names]

    def records(self, indices: Sequence[int]) -> list[dict]:
        """Question records without images: ``id`` (str), ``question``, ``answer`` (GQA / toy;
        VQAv2: ``multiple_choice_answer``), ``answers`` (VQAv2: the annotators' strings), ``type``."""
        indices = list(indices)
        if not indices:
            return []
        cols = self.questions.select_columns(self._meta_columns())[indices]
        out = []
        for i in range(len(indices)):
            row = {k: v[i] for k, v in cols.items()}
            answers = row.get("answers")
            if answers is not None:
                answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
            out.append({
                "id": str(row[self.id_column]),
                "question": row["question"],
                "answer": row.get("answer", row.get("multiple_choice_answer")),
                "answers": answers,
                "type": _question_type(row),
                "image_key": row.get(self.image_key_column) if self.image_key_column else None,
            })
        return out

    def _image_row_index(self) -> dict:
        if self._image_index is None:
            self._image_index = {str(k): i for i, k in enumerate(self.images["id"])}
        return self._image_index

    def load_images(self, records: Sequence[dict], indices: Sequence[int]) -> list:
        """Decode the images of these questions (RGB PIL), ``None`` where one is missing or broken;
        the reason is kept in ``image_errors`` under the question id."""
        raw: list = [None] * len(records)
        if self.images is None:  # VQAv2: inline
            col = self.questions.select_columns(["image"])[list(indices)]["image"]
            raw = list(col)
        else:
            index = self._image_row_index()
            rows = [index.get(str(r["image_key"])) for r in records]
            present = sorted({r for r in rows if r is not None})
            got = dict(zip(present, self.images.select_columns(["image"])[present]["image"])) if present else {}
            raw = [got.get(r) if r is not None else None for r in rows]
        out = []
        for rec, value in zip(records, raw):
            if value is None:
                key = rec.get("image_key")
                self.image_errors[rec["id"]] = f"image {key!r} not found" if key is not None else "no image"
                out.append(None)
                continue
            try:
                out.append(decode_image(value))
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
                msg = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(e))  # PIL names the buffer's address
                self.image_errors[rec["id"]] = f"cannot decode: {type(e).__name__}: {msg}"
                out.append(None)
        return out

    def subset(self, rows: Sequence[int], split: str | None = None) -> "QADataset":
        """The questions at ``rows`` (in that order) as a data set of their own; images are shared."""
        from dataclasses import replace

        return replace(self, questions=self.questions.select(list(rows)), split=split or self.split,
                       image_errors={}, _ids=None)

    def batch(self, indices: Sequence[int]) -> tuple[list[dict], list]:
        """(records, images) for these rows, with questions whose image failed dropped."""
        recs = self.records(indices)
        imgs = self.load_images(recs, indices)
        keep = [k for k, im in enumerate(imgs) if im is not None]
        return [recs[k] for k in keep], [imgs[k] for k in keep]


# ---------------------------------------------------------------- model inputs

def _left_pad(processor) -> None:
    # Batched generation needs the prompts' ends aligned; training uses the same layout.
    processor.tokenizer.padding_side = "left"


def make_eval_batch(processor, records: Sequence[dict], images: Sequence) -> dict:
    """Processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``), left padded, for the
    evaluation prompt of each record (:func:`diffopsearch.data.prompts.format_prompt`)."""
    from .prompts import format_prompt

    return encode_prompts(processor, [format_prompt(r["question"], processor) for r in records], images)


def encode_prompts(processor, prompts: Sequence[str], images: Sequence) -> dict:
    """Processor inputs for already formatted prompts and their images (none: text only), left
    padded (shared by :func:`make_eval_batch` and the lmms-eval model)."""
    _left_pad(processor)
    images = list(images) or None
    return dict(processor(text=list(prompts), images=images, padding=True, return_tensors="pt"))


def make_train_batch(processor, examples: Sequence[dict], images: Sequence, answer_key: str = "answer") -> dict:
    """Training batch for the search: prompt + answer + eos, left padded.

    ``labels`` are -100 everywhere except the answer tokens and the eos; ``position_ids`` count from
    the first real token of each row (left padding); ``query_index`` (B,) is each row's last prompt
    token, whose attention ranks tokens for ``attn`` scores: generation sees that token last, and a
    score from the last position would read the answer. The answer is tokenized on its own (no
    special tokens), as the model generates it after the prompt, so prompt tokens never change."""
    import torch

    enc = make_eval_batch(processor, examples, images)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows, answer_lens = [], []
    for i, ex in enumerate(examples):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        answer = tok(str(ex[answer_key]), add_special_tokens=False)["input_ids"] + [eos]
        rows.append(prompt + answer)
        answer_lens.append(len(answer))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, a) in enumerate(zip(rows, answer_lens)):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention[i, width - len(r):] = 1
        labels[i, width - a:] = input_ids[i, width - a:]
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    query_index = torch.tensor([width - a - 1 for a in answer_lens], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "labels": labels,
           "query_index": query_index}
    out.update({k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")})
    return out
