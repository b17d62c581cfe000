"""Loading GQA / VQAv2 / the toy world from local copies in the real layouts, lazily."""
from __future__ import annotations

import pytest

from diffopsearch.data.datasets import load_from_config, load_qa, make_eval_batch, make_train_batch
from diffopsearch.errors import UserError

import fixtures as fx  # tests/fixtures.py (pytest puts tests/ on sys.path)


def test_gqa_fixture_loads_through_the_hub_code_path(tmp_path):
    root = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)
    ds = load_qa("gqa", str(root))  # default configs: testdev_balanced_instructions / _images, split testdev
    assert len(ds) == 6 and ds.metric == "gqa" and ds.split == "testdev"
    assert ds.ids == [str(20000000 + k) for k in range(6)]
    recs = ds.records([0, 4])
    assert recs[0]["answer"] == "yes" and recs[0]["type"] == "query" and recs[0]["image_key"] == "n1000"
    assert recs[1]["type"] == fx.GQA_STRUCTURAL[4] and recs[1]["image_key"] == "n1002"
    # images stay undecoded bytes in the table; a batch decodes only its own
    assert ds.images.features["image"].decode is False
    recs, imgs = ds.batch([1, 2])
    assert [r["id"] for r in recs] == ["20000001", "20000002"]
    assert imgs[0].mode == "RGB" and imgs[0].size == (32, 32)
    assert imgs[0].getpixel((0, 0)) == (0, 0, 0) and imgs[1].getpixel((0, 0)) == (53, 97, 151)
    assert ds.image_errors == {}


def test_gqa_broken_and_missing_images_are_counted_and_skipped(tmp_path):
    root = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2, broken=("n1001",), missing_images=("n1002",))
    ds = load_qa("gqa", str(root))
    recs, imgs = ds.batch(range(6))
    assert [r["id"] for r in recs] == ["20000000", "20000001"] and len(imgs) == 2
    assert set(ds.image_errors) == {"20000002", "20000003", "20000004", "20000005"}
    assert "cannot decode" in ds.image_errors["20000002"] and "not found" in ds.image_errors["20000004"]


def test_gqa_missing_column_is_a_user_error(tmp_path):
    root = fx.write_gqa(tmp_path / "GQA", drop_question_columns=("imageId",))
    with pytest.raises(UserError) as e:
        load_qa("gqa", str(root))
    assert "'imageId'" in str(e.value) and "imageId -> id" in str(e.value)


def test_vqav2_fixture(tmp_path):
    root = fx.write_vqav2(tmp_path / "VQAv2", n=6, broken=(262148003,))
    ds = load_qa("vqav2", str(root))
    assert len(ds) == 6 and ds.metric == "vqa" and ds.ids[0] == "262148000"
    rec = ds.records([1])[0]
    assert rec["answers"] == fx.VQA_CASES[1][1] and rec["type"] == "number" and rec["answer"] == "2"
    recs, imgs = ds.batch(range(6))
    assert len(recs) == 5 and "262148003" in ds.image_errors
    assert ds.questions.features["image"].decode is False


def test_vqav2_missing_answers_is_a_user_error(tmp_path):
    root = fx.write_vqav2(tmp_path / "VQAv2", drop_columns=("answers",))
    with pytest.raises(UserError, match="'answers'.*10 annotator answers"):
        load_qa("vqav2", str(root))


def test_toy_world_and_config_entry(tmp_path):
    from diffopsearch.data import world

    world.write_world(tmp_path / "world", seed=0, sizes={"train": 3, "test": 4})
    cfg = {"name": "toy", "path": str(tmp_path / "world"), "questions_config": None, "images_config": None,
           "split": "test"}
    ds = load_from_config(cfg, limit=5)
    assert len(ds) == 5 and ds.records([0])[0]["type"] in world.FAMILIES
    recs, imgs = ds.batch(range(5))
    assert len(recs) == 5 and imgs[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    train = load_from_config(cfg, split="train", search=True)
    assert all(i.startswith("train-") for i in train.ids)


def test_same_folder_name_never_shares_a_stale_cache(tmp_path):
    # datasets 5 keys the cache of a local folder by its base name: two worlds both called "w" collide.
    from diffopsearch.data import world

    def written(seed, n):  # (id, question, answer) of what write_world wrote
        return [(r["id"], r["question"], r["answer"]) for r in world.generate_split("test", n, seed)[1]]

    def loaded(ds):
        return [(r["id"], r["question"], r["answer"]) for r in ds.records(range(len(ds)))]

    world.write_world(tmp_path / "a" / "w", seed=0, sizes={"test": 2})
    world.write_world(tmp_path / "b" / "w", seed=1, sizes={"test": 5})
    world.write_world(tmp_path / "c" / "w", seed=1, sizes={"test": 2})  # same name and size as a/w
    a = load_qa("toy", str(tmp_path / "a" / "w"), split="test")
    b = load_qa("toy", str(tmp_path / "b" / "w"), split="test")
    c = load_qa("toy", str(tmp_path / "c" / "w"), split="test")
    assert len(a.images) == 2 and len(b.images) == 5 and len(c.images) == 2
    assert written(0, 2) != written(1, 2)  # the two same-sized worlds really differ
    assert loaded(a) == written(0, 2) and loaded(b) == written(1, 5) and loaded(c) == written(1, 2)
    # a world regenerated in place (same folder, same size, other seed) is read afresh too
    world.write_world(tmp_path / "a" / "w", seed=2, sizes={"test": 2})
    assert loaded(load_qa("toy", str(tmp_path / "a" / "w"), split="test")) == written(2, 2) != written(0, 2)


def test_split_slice_applies_to_questions_only(tmp_path):
    root = fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)
    ds = load_qa("gqa", str(root), split="testdev[:3]")
    assert len(ds) == 3 and len(ds.images) == 3
    assert len(ds.batch(range(3))[0]) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "validation"}, "split 'validation'"),
    ({"questions_config": "nope"}, "config 'nope'"),
    ({"limit": 0}, "limit 0"),
])
def test_bad_split_config_limit_are_user_errors(tmp_path, kwargs, match):
    root = fx.write_gqa(tmp_path / "GQA")
    with pytest.raises(UserError, match=match):
        load_qa("gqa", str(root), **kwargs)


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_qa("gqa", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="dataset.name"):
        load_qa("coco", str(tmp_path))


def test_train_batch_labels_only_the_answer(tmp_path):
    from diffopsearch.backbone import toy

    processor = toy.build_processor()
    root = fx.write_gqa(tmp_path / "GQA", n_images=2, per_image=2)
    ds = load_qa("gqa", str(root))
    recs, imgs = ds.batch(range(4))
    recs[0] = {**recs[0], "question": "What color is the small red circle left of the large blue square?"}
    recs[1] = {**recs[1], "answer": "red circle"}
    batch = make_train_batch(processor, recs, imgs)
    ev = make_eval_batch(processor, recs, imgs)
    tok = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and batch["pixel_values"].shape[0] == 4
    for i, rec in enumerate(recs):
        row = ids[i][mask[i].bool()].tolist()
        prompt = ev["input_ids"][i][ev["attention_mask"][i].bool()].tolist()
        answer = tok(rec["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row == prompt + answer  # left padded: padding first, then prompt, answer, eos
        assert mask[i, -1] == 1 and (mask[i, : ids.shape[1] - len(row)] == 0).all()
        lab = labels[i][labels[i] != -100].tolist()
        assert lab == answer and (labels[i, -len(answer):] == ids[i, -len(answer):]).all()
        assert batch["position_ids"][i, -1].item() == len(row) - 1
    assert tok.decode(labels[1][labels[1] != -100][:-1]) == "red circle"


@pytest.mark.parametrize("a, b, overlap", [
    ("train", "test", False),
    ("validation[:4000]", "validation[4000:]", False),
    ("validation[:4000]", "validation", True),
    ("validation[:4000]", "validation[3999:5000]", True),
    ("val[:4000]", "testdev", False),
    ("val[-1000:]", "val[:4000]", True),  # relative to the end: not known to be disjoint
])
def test_search_and_eval_splits_overlap(a, b, overlap):
    from diffopsearch.data.datasets import splits_overlap

    assert splits_overlap(a, b) is overlap and splits_overlap(b, a) is overlap


def test_every_shipped_dataset_keeps_the_search_off_the_eval_questions():
    from diffopsearch import config as C
    from diffopsearch.data.datasets import splits_overlap

    for name in ("toy", "gqa", "vqav2"):
        ds = C.compose("search", [f"dataset={name}"]).dataset
        same_config = (ds.search_questions_config or ds.questions_config) == ds.questions_config
        assert not (same_config and splits_overlap(ds.search_split, ds.split)), name
