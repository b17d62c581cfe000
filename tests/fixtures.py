"""Helpers the test modules share, imported as ``import fixtures as fx`` (pytest fixtures are in
conftest.py). Heavy libraries (torch, transformers, datasets, the package) are imported inside the
functions: conftest.py imports this module before torch is first imported.

Data sets: small local copies of the real hub data sets, in exactly their schemas and layouts.

- ``write_gqa``: lmms-eval's GQA (``lmms-lab-encoder/GQA``): one folder per config
  (``testdev_balanced_instructions``, ``testdev_balanced_images``), parquet shards named
  ``testdev-00000-of-00001.parquet``, and a README whose YAML declares ``dataset_info`` and ``configs``
  as the hub card does. Question rows carry every column of the hub data (isBalanced, groups,
  entailed, equivalent, types, annotations, semantic, semanticStr).
- ``write_vqav2``: lmms-eval's VQAv2 (``lmms-lab-encoder/VQAv2``): ``data/validation-*.parquet`` with
  question_type, multiple_choice_answer, answers (10 dicts), image_id, answer_type, question_id,
  question and the image inline.

Both are read by ``datasets.load_dataset(folder, config, split=...)``, the very call that reads the
hub. Images are tiny PNGs; ``broken`` ids get bytes that are not an image.

Models: tiny random LLaVAs of the real classes (``tiny_model``, ``tiny_model_dir``; ``tiny``, ``batch``
and ``embeddings`` for the reduced forward's tests). The command: ``run_cli`` runs it in process. The
search: a small search run, a simulated Ctrl-C, plan.json compared without its ``run`` record. Damaged
inputs: an empty parquet split, plan files with one kind of damage each.
"""
from __future__ import annotations

import io
from pathlib import Path

GQA_QUESTIONS_CONFIG = "testdev_balanced_instructions"
GQA_IMAGES_CONFIG = "testdev_balanced_images"
GQA_SPLIT = "testdev"

_GQA_INFO = """dataset_info:
- config_name: {images}
  features:
  - name: id
    dtype: string
  - name: image
    dtype: image
  splits:
  - name: {split}
    num_bytes: 1024
    num_examples: {n_images}
- config_name: {questions}
  features:
  - name: id
    dtype: string
  - name: imageId
    dtype: string
  - name: question
    dtype: string
  - name: answer
    dtype: string
  - name: fullAnswer
    dtype: string
  - name: isBalanced
    dtype: bool
  - name: groups
    struct:
    - name: global
      dtype: string
    - name: local
      dtype: string
  - name: entailed
    dtype: string
  - name: equivalent
    dtype: string
  - name: types
    struct:
    - name: structural
      dtype: string
    - name: semantic
      dtype: string
    - name: detailed
      dtype: string
  - name: annotations
    struct:
    - name: answer
      dtype: string
    - name: question
      dtype: string
    - name: fullAnswer
      dtype: string
  - name: semantic
    list:
    - name: operation
      dtype: string
    - name: argument
      dtype: string
    - name: dependencies
      sequence: int64
  - name: semanticStr
    dtype: string
  splits:
  - name: {split}
    num_bytes: 1024
    num_examples: {n_questions}
"""
_GQA_CONFIGS = """configs:
- config_name: {images}
  data_files:
  - split: {split}
    path: {images}/{split}-*
- config_name: {questions}
  data_files:
  - split: {split}
    path: {questions}/{split}-*
"""

_VQA_INFO = """dataset_info:
  features:
  - name: question_type
    dtype: string
  - name: multiple_choice_answer
    dtype: string
  - name: answers
    list:
    - name: answer
      dtype: string
    - name: answer_confidence
      dtype: string
    - name: answer_id
      dtype: int64
  - name: image_id
    dtype: int64
  - name: answer_type
    dtype: string
  - name: question_id
    dtype: int64
  - name: question
    dtype: string
  - name: image
    dtype: image
  splits:
  - name: {split}
    num_bytes: 1024
    num_examples: {n}
"""
_VQA_CONFIGS = """configs:
- config_name: default
  data_files:
  - split: {split}
    path: data/{split}-*
"""


def _readme(info: str, configs: str, title: str) -> str:
    # The card's dataset_info describes the files as they are, so a fixture with a column dropped
    # (to test the error) leaves it out and keeps only the configs.
    return f"---\nlicense: mit\n{info}{configs}---\n# {title} (test fixture in lmms-eval's layout)\n"


def png(seed: int, size: int = 32) -> bytes:
    """A small deterministic RGB PNG."""
    from PIL import Image

    img = Image.new("RGB", (size, size), ((seed * 53) % 256, (seed * 97) % 256, (seed * 151) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gqa_features(drop: tuple[str, ...] = ()):
    import datasets

    s = datasets.Value("string")
    feats = {
        "id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s, "isBalanced": datasets.Value("bool"),
        "groups": {"global": s, "local": s}, "entailed": s, "equivalent": s,
        "types": {"structural": s, "semantic": s, "detailed": s},
        "annotations": {"answer": s, "question": s, "fullAnswer": s},
        "semantic": [{"operation": s, "argument": s, "dependencies": datasets.Sequence(datasets.Value("int64"))}],
        "semanticStr": s,
    }
    return datasets.Features({k: v for k, v in feats.items() if k not in drop})


GQA_STRUCTURAL = ("query", "verify", "logical", "choose", "compare")
GQA_ANSWERS = ("yes", "no", "left", "right", "table", "red")


def gqa_rows(n_images: int = 3, per_image: int = 2) -> tuple[list[dict], list[dict]]:
    questions, images = [], []
    for i in range(n_images):
        image_id = f"n{1000 + i}"
        images.append({"id": image_id, "image": {"bytes": png(i), "path": None}})
        for j in range(per_image):
            k = i * per_image + j
            ans = GQA_ANSWERS[k % len(GQA_ANSWERS)]
            questions.append({
                "id": f"{20000000 + k}", "imageId": image_id, "question": f"Is the object number {k} red?",
                "answer": ans, "fullAnswer": f"The answer is {ans}.", "isBalanced": True,
                "groups": {"global": None, "local": f"0{k}-red"}, "entailed": "", "equivalent": f"{20000000 + k}",
                "types": {"structural": GQA_STRUCTURAL[k % len(GQA_STRUCTURAL)], "semantic": "attr",
                          "detailed": "existAttr"},
                "annotations": {"answer": "", "question": "", "fullAnswer": ""},
                "semantic": [{"operation": "select", "argument": "object", "dependencies": []},
                             {"operation": "verify color", "argument": "red", "dependencies": [0]}],
                "semanticStr": "select: object ->verify color: red [0]",
            })
    return questions, images


def write_gqa(root, n_images: int = 3, per_image: int = 2, broken: tuple[str, ...] = (),
              missing_images: tuple[str, ...] = (), drop_question_columns: tuple[str, ...] = (),
              questions_config: str = GQA_QUESTIONS_CONFIG, images_config: str = GQA_IMAGES_CONFIG,
              split: str = GQA_SPLIT, answers: dict | None = None) -> Path:
    """Write a GQA fixture under ``root``; returns the folder. ``broken``: image ids whose bytes are
    not an image; ``missing_images``: image ids left out of the images config; ``answers``:
    question id -> answer, replacing the default answers."""
    import datasets

    root = Path(root)
    questions, images = gqa_rows(n_images, per_image)
    for q in questions:
        if answers and q["id"] in answers:
            q["answer"] = answers[q["id"]]
    for row in images:
        if row["id"] in broken:
            row["image"] = {"bytes": b"this is not an image", "path": None}
    images = [r for r in images if r["id"] not in missing_images]
    questions = [{k: v for k, v in q.items() if k not in drop_question_columns} for q in questions]
    (root / questions_config).mkdir(parents=True, exist_ok=True)
    (root / images_config).mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(questions, features=gqa_features(drop_question_columns)).to_parquet(
        str(root / questions_config / f"{split}-00000-of-00001.parquet"))
    datasets.Dataset.from_list(images, features=datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image()})).to_parquet(
        str(root / images_config / f"{split}-00000-of-00001.parquet"))
    fmt = dict(images=images_config, questions=questions_config, split=split, n_images=len(images),
               n_questions=len(questions))
    info = "" if drop_question_columns else _GQA_INFO.format(**fmt)
    (root / "README.md").write_text(_readme(info, _GQA_CONFIGS.format(**fmt), "GQA"))
    return root


def vqa_features(drop: tuple[str, ...] = ()):
    import datasets

    s = datasets.Value("string")
    feats = {
        "question_type": s, "multiple_choice_answer": s,
        "answers": [{"answer": s, "answer_confidence": s, "answer_id": datasets.Value("int64")}],
        "image_id": datasets.Value("int64"), "answer_type": s, "question_id": datasets.Value("int64"),
        "question": s, "image": datasets.Image(),
    }
    return datasets.Features({k: v for k, v in feats.items() if k not in drop})


VQA_CASES = (  # (answer_type, the 10 annotator answers)
    ("yes/no", ["yes"] * 10),
    ("number", ["2"] * 7 + ["two"] * 2 + ["3"]),
    ("other", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3),
    ("yes/no", ["no"] * 9 + ["yes"]),
    ("other", ["table"] * 2 + ["desk"] * 8),
    ("number", ["1"] * 10),
)


def vqa_rows(n: int = 6) -> list[dict]:
    rows = []
    for k in range(n):
        atype, answers = VQA_CASES[k % len(VQA_CASES)]
        mc = max(set(answers), key=answers.count)
        rows.append({
            "question_type": {"yes/no": "is the", "number": "how many", "other": "what color is the"}[atype],
            "multiple_choice_answer": mc,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
            "image_id": 100 + k, "answer_type": atype, "question_id": 262148000 + k,
            "question": f"What about thing {k}?", "image": {"bytes": png(k), "path": None},
        })
    return rows


def write_vqav2(root, n: int = 6, broken: tuple[int, ...] = (), drop_columns: tuple[str, ...] = (),
                split: str = "validation") -> Path:
    """Write a VQAv2 fixture under ``root``; ``broken``: question ids whose image is not an image."""
    import datasets

    root = Path(root)
    rows = vqa_rows(n)
    for r in rows:
        if r["question_id"] in broken:
            r["image"] = {"bytes": b"\x89PNG broken", "path": None}
    rows = [{k: v for k, v in r.items() if k not in drop_columns} for r in rows]
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=vqa_features(drop_columns)).to_parquet(
        str(root / "data" / f"{split}-00000-of-00001.parquet"))
    info = "" if drop_columns else _VQA_INFO.format(split=split, n=len(rows))
    (root / "README.md").write_text(_readme(info, _VQA_CONFIGS.format(split=split), "VQAv2"))
    return root


TINY_TEXT = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


def tiny_model(seed: int = 0, diverse: bool = True):
    """A random toy LLaVA small enough for a test (real classes, real processor). ``diverse``: large
    initial weights, so that answers depend on the image and question (with the default 0.02 a
    random model says the same words whatever it is asked)."""
    from diffopsearch.backbone import toy

    init = {"initializer_range": 0.5} if diverse else {}
    return (toy.build_model(seed, vision={**TINY_VISION, **init}, text={**TINY_TEXT, **init}),
            toy.build_processor())


TINY_TEXT4 = {**TINY_TEXT, "num_hidden_layers": 4}  # the 4-layer text model of `tiny4` and `tiny_model_dir`


def tiny_model_dir(path: Path) -> Path:
    """Save a random 4-layer toy LLaVA (large initial weights) and its processor to ``path``; returns it."""
    from diffopsearch.backbone import toy

    # two CLIP layers: the LLaVA feature layer (-2) is then a layer's output, so the CLS score exists
    model = toy.build_model(0, vision={**TINY_VISION, "num_hidden_layers": 2, "initializer_range": 0.5},
                            text={**TINY_TEXT4, "initializer_range": 0.5})
    model.save_pretrained(path)
    toy.build_processor().save_pretrained(path)
    return path


# --------------------------------------------------------------------------- the reduced forward's tiny LLaVA
# CLIP 96 px / patch 16 = 6 x 6 = 36 visual tokens, a 4-layer GQA Llama.

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": 96, "patch_size": 16}
TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}
N_VIS = 36


def tiny(impl: str = "sdpa", seed: int = 0):
    """A random LLaVA of VISION / TEXT with attention implementation ``impl``, its parameters frozen."""
    from diffopsearch.backbone.toy import build_model

    m = build_model(seed, vision=VISION, text=TEXT)
    if impl != "sdpa":
        m.set_attn_implementation(impl)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def batch(model, prompt_lens=(5, 2, 8), seed=0):
    """Left-padded batch: bos, a few words, 36 image tokens, a few words; one image per sample."""
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    pre = [int(x) for x in torch.randint(5, cfg.text_config.vocab_size, (2,), generator=g)]
    rows = []
    for n_words in prompt_lens:
        words = torch.randint(5, cfg.text_config.vocab_size, (n_words,), generator=g).tolist()
        rows.append([1] + pre + [cfg.image_token_id] * N_VIS + words)
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), cfg.pad_token_id)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        am[b, T - len(r):] = 1
    pix = torch.randn(len(rows), 3, 96, 96, generator=g)
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pix), pos


def embeddings(model, inputs):
    """inputs_embeds with image features scattered in, as LlavaModel makes them."""
    import torch

    ids = inputs["input_ids"]
    emb = model.model.get_input_embeddings()(ids)
    feats = torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                           return_dict=True).pooler_output))
    return emb.masked_scatter((ids == model.config.image_token_id)[..., None], feats)


# --------------------------------------------------------------------------- the command in process


def run_cli(capsys, *argv):
    """Run the ``diffopsearch`` command in process (``cli.main``); returns (exit code, stdout, stderr)."""
    from diffopsearch import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_message(err: str) -> str:
    """The command's own one line on stderr (datasets' progress bars share the stream)."""
    (line,) = [x for x in err.splitlines() if x.startswith("diffopsearch ")]
    return line


# --------------------------------------------------------------------------- a small search, stopped and resumed

# A search of a few steps on the tiny model and a small toy world; the eval of its plan is 2 questions.
SEARCH_ARGS = ["budget=0.6", "limit=2", "batch_size=2", "max_new_tokens=2", "search.steps=4", "search.batch_size=2",
               "search.plans_per_step=2", "search.knob_plans=1", "search.checkpoint_every=2",
               "search.candidate_layers=[1,2]", "search.select_samples=2", "model.device=cpu", "dataset=toy"]


def run_search(model, proc, train, out, **kw):
    """``loop.search`` over layers 1 and 2 of ``model`` (4 steps, checkpoints every 2, unless ``kw`` says
    otherwise); ``out``: the run directory (None: no files); ``resume=True`` continues from its checkpoint."""
    from diffopsearch.plan import backbone_info
    from diffopsearch.search import loop
    from diffopsearch.search.space import Planner, make_space

    space = make_space(model.config, [1, 2])
    resume = kw.pop("resume", False)
    st = loop.SearchSettings(**{**dict(budget=0.6, steps=4, batch_size=2, plans_per_step=2, knob_plans=1,
                                       checkpoint_every=2, lr=0.1), **kw})
    planner = Planner(space, backbone_info(model.config), st.budget, model.config.text_config, 20.0)
    return loop.search(model, proc, train, space, planner, st, 20.0, out_dir=out, progress=False, resume=resume)


def interrupt_on_call(monkeypatch, module, name, n):
    """Make ``module.name`` raise KeyboardInterrupt on its n-th call (1-based), as Ctrl-C would."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def plan_without_run(path: Path) -> bytes:
    """plan.json's bytes with the one field that may differ between runs (``run``) taken out."""
    import json

    d = json.loads(path.read_text())
    assert {"created", "seconds", "resume", "resumed_from"} <= set(d.pop("run"))
    return json.dumps(d, indent=2).encode()


# --------------------------------------------------------------------------- damaged inputs


def empty_parquet(path: Path) -> None:
    """Rewrite the parquet file ``path`` with the same columns and no row."""
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).slice(0, 0), path)  # the same columns, no row


def write_plan_files(d: Path, model_dir: Path) -> dict:
    """Plan files, one per kind of damage; ``good`` is valid for the tiny model."""
    import json

    from transformers import AutoConfig

    from diffopsearch.plan import FORMAT, backbone_info

    d.mkdir(parents=True)
    backbone = backbone_info(AutoConfig.from_pretrained(model_dir), name="tiny")
    good = {"format": FORMAT, "method": "custom", "backbone": backbone, "budget": 0.8, "seed": 0,
            "sites": [{"layer": 1, "keep": 72, "score": "norm", "anchors": "topk", "merge": 0.0, "sharpness": 0.0,
                       "locality": 0.0, "reweight": 0.0}]}

    def variant(**change):
        p = json.loads(json.dumps(good))
        for path, value in change.items():
            obj = p
            *head, last = path.split("__")
            for k in head:
                obj = obj[int(k)] if isinstance(obj, list) else obj[k]
            obj[last] = value
        return json.dumps(p)

    text = json.dumps(good)
    files = {"good": text, "empty": "", "truncated": text[: len(text) // 2], "not_json": "hello, I am a plan\n",
             "binary": b"\x80\x81\x00\xffPK",
             "version": variant(format="diffopsearch.plan/9"),
             "grid": variant(backbone__visual_tokens=576, backbone__grid=[24, 24]),
             "layers": variant(backbone__num_layers=32),
             "keep": variant(sites__0__keep=200),
             "layer": variant(sites__0__layer=9)}
    out = {}
    for name, content in files.items():
        out[name] = d / f"{name}.json"
        (out[name].write_bytes if isinstance(content, bytes) else out[name].write_text)(content)
    (d / "emptydir").mkdir()
    out["dir"] = d / "emptydir"
    out["missing"] = d / "nowhere.json"
    return out
