"""The toy world: deterministic, GQA's schema, disjoint splits, questions that need many regions."""
import collections

import datasets
import pytest

from diffopsearch.data import world


def test_same_seed_same_world():
    s1, r1 = world.generate_split("test", 30, seed=3)
    s2, r2 = world.generate_split("test", 30, seed=3)
    assert r1 == r2 and s1 == s2
    assert world.png_bytes(world.render(s1[0])) == world.png_bytes(world.render(s2[0]))
    _, r3 = world.generate_split("test", 30, seed=4)
    assert r3 != r1


def test_families_answers_and_balance():
    scenes, rows = world.generate_split("validation", 300, seed=0)
    fams = collections.Counter(r["family"] for r in rows)
    assert set(fams) == set(world.FAMILIES)
    assert min(fams.values()) > 250  # nearly every scene supports every family
    vocab = set(world.vocabulary())
    for r in rows:
        assert len(r["answer"].split()) == 1 and r["answer"] in vocab
        assert set(r["question"].lower().rstrip("?").split()) <= vocab
    for fam in ("exist", "relation", "compare"):  # yes/no families are not decided by the prior
        c = collections.Counter(r["answer"] for r in rows if r["family"] == fam)
        assert 0.35 < c["yes"] / (c["yes"] + c["no"]) < 0.65


def test_answers_are_true_of_the_scene():
    scenes, rows = world.generate_split("test", 50, seed=1)
    by_id = {s.image_id: s for s in scenes}
    checked = 0
    for r in rows:
        objs = by_id[r["imageId"]].objects
        words = r["question"].rstrip("?").split()
        if r["family"] == "count" and len(words) == 6 and words[3] == "objects":  # How many red objects are there
            assert int(r["answer"]) == sum(o.color == words[2] for o in objs)
            checked += 1
        if r["family"] == "exist" and len(words) == 5 and words[3] in world.COLORS and words[4] in world.SHAPES:  # Is there a red circle
            assert r["answer"] == ("yes" if any((o.color, o.shape) == (words[3], words[4]) for o in objs) else "no")
            checked += 1
    assert checked > 5


def test_objects_spread_over_the_grid():
    scenes, _ = world.generate_split("test", 200, seed=0)
    cells = {(o.row, o.col) for s in scenes for o in s.objects}
    assert len(cells) > 0.9 * world.GRID ** 2  # every region of the image matters somewhere


def test_each_object_is_drawn_inside_its_own_patch():
    """One object per vision patch (so each visual token is one object or empty): the rendered pixels of
    a cell are the background plus the colour of the object the scene puts there, nothing else, and the
    grid is the toy backbone's patch grid (12 x 12 patches of 16 px = its 144 visual tokens)."""
    import numpy as np

    from diffopsearch.backbone import toy

    cfg = toy.build_config()
    assert cfg.vision_config.image_size == world.IMAGE_SIZE and cfg.vision_config.patch_size == world.CELL
    assert cfg.image_seq_length == world.GRID ** 2 == 144
    scenes, _ = world.generate_split("test", 8, seed=0)
    assert {o.size for s in scenes for o in s.objects} == set(world.SIZES)  # both sizes are checked
    for scene in scenes:
        px = np.asarray(world.render(scene))
        at = {(o.row, o.col): o for o in scene.objects}
        assert len(at) == len(scene.objects)  # never two objects in one cell
        for row in range(world.GRID):
            for col in range(world.GRID):
                cell = px[row * world.CELL:(row + 1) * world.CELL, col * world.CELL:(col + 1) * world.CELL]
                colours = {tuple(int(v) for v in c) for c in cell.reshape(-1, 3)}
                o = at.get((row, col))
                if o is None:
                    assert colours == {world.BACKGROUND}, (scene.image_id, row, col)
                else:
                    assert colours == {world.BACKGROUND, world.COLORS[o.color]}, (scene.image_id, o)
                    # the object's area follows its size (a large one covers more of the cell than a small one)
                    filled = int((cell != np.array(world.BACKGROUND)).any(-1).sum())
                    side = world.SIZES[o.size]
                    assert side * side / 3 < filled <= side * side, (scene.image_id, o, filled)


def test_written_world_loads_like_the_hub_dataset(tmp_path):
    world.write_world(tmp_path / "w", seed=0, sizes={"train": 6, "test": 4})
    q = datasets.load_dataset(str(tmp_path / "w"), "instructions", split="test")
    im = datasets.load_dataset(str(tmp_path / "w"), "images", split="test")
    assert {"id", "imageId", "question", "answer", "fullAnswer", "types", "family"} <= set(q.column_names)
    assert set(im.column_names) == {"id", "image"}
    assert set(q["imageId"]) <= set(im["id"])
    assert im[0]["image"].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    train_ids = set(datasets.load_dataset(str(tmp_path / "w"), "images", split="train")["id"])
    assert not train_ids & set(im["id"])  # disjoint images across splits
