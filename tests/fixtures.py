"""Small local copies of the real hub data sets, in exactly their schemas and layouts.

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
