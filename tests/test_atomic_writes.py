"""Atomic writes: every file the tool writes appears whole or not at all.

Each write goes to a temporary name and is renamed over the target (checked by reading every write
call of the package), so a crash or kill while writing leaves the old file and no temporary, and a
kill between a checkpoint's tensors and its JSON still resumes to the same search state."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from diffopsearch.errors import Interrupted
from diffopsearch.search import checkpoint as ck
from fixtures import interrupt_on_call, run_search  # a Ctrl-C on the n-th call, a small search

PACKAGE = Path(__file__).resolve().parent.parent / "diffopsearch"


pytestmark = pytest.mark.usefixtures("clean_cli_env")  # tests/conftest.py


# open() for writing outside io.py: the two logs grow by whole JSON lines (readers skip a torn last
# line; evaluate.py's "r+" closes such a line before the next append), and the prepare lock file.
APPEND_ONLY = {("search/loop.py", "a"), ("evaluate.py", "a"), ("evaluate.py", "r+"), ("backbone/train.py", "a"),
               ("backbone/load.py", "w")}

# Other writers outside io.py: the toy world is written into a temporary directory that is renamed
# whole; the toy backbone's training recipe (scripts/train_toy.py, not a command) save_pretrained's
# its final model into the directory it is given.
NON_ATOMIC_OK = {("backbone/train.py", "save_pretrained"), ("data/world.py", "to_parquet"),
                 ("data/world.py", "write_text")}

WRITERS = ("write_text", "write_bytes", "save_pretrained", "to_parquet", "savefig", "save_file", "dump", "save")


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node


def test_every_file_the_tool_writes_goes_through_a_temporary_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel == "io.py":
            continue
        for call in _calls(path):
            f = call.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "open":
                mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords
                                                                    if k.arg == "mode"), None)
                mode = mode.value if isinstance(mode, ast.Constant) else "r"
                if any(c in mode for c in "wax+") and (rel, mode.replace("b", "")) not in APPEND_ONLY:
                    offenders.append(f"{rel}:{call.lineno} open(..., {mode!r})")
            elif name in WRITERS and (rel, name) not in NON_ATOMIC_OK:
                if any(isinstance(a, ast.Name) and a.id == "tmp" for a in call.args):
                    continue  # writes atomic_write's temporary file (io.atomic_write(path, lambda tmp: ...))
                if name in ("dump", "save") and not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                                     and f.value.id in ("json", "torch", "np", "numpy", "pickle")):
                    continue  # plan.save() and the like go through io.py themselves
                offenders.append(f"{rel}:{call.lineno} {name}(...)")
    assert offenders == [], "write through diffopsearch.io (temporary name + rename): " + ", ".join(offenders)


def test_a_kill_between_the_checkpoint_tensors_and_its_json_still_resumes(tmp_path, monkeypatch, tiny4, world_train):
    from diffopsearch import io

    model, proc = tiny4
    straight = run_search(model, proc, world_train, tmp_path / "a", steps=3, checkpoint_every=1)
    real = io.atomic_write_json
    interrupt_on_call(monkeypatch, io, "atomic_write_json", 2)  # the new tensors of step 2 are on disk, not its JSON
    with pytest.raises(Interrupted, match="at step 1 of 3 .last checkpoint: step 1"):
        run_search(model, proc, world_train, tmp_path / "b", steps=3, checkpoint_every=1)
    monkeypatch.setattr(io, "atomic_write_json", real)
    d = tmp_path / "b" / ck.CKPT_DIR
    assert json.loads((d / ck.CKPT_META).read_text())["step"] == 1 and (d / ck.CKPT_PREV).exists()
    resumed = run_search(model, proc, world_train, tmp_path / "b", steps=3, checkpoint_every=1, resume=True)
    assert resumed.resumed_from == 1
    for (name, x), (_, y) in zip(straight.state.named_parameters(), resumed.state.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("crash_at", ["write", "rename"])
def test_a_crash_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, crash_at):
    from diffopsearch import io

    target = tmp_path / "plan.json"
    io.atomic_write_json(target, {"v": 1})

    def half_then_crash(tmp):
        Path(tmp).write_text('{"v": 2, "sit')  # half of the new content
        raise KeyboardInterrupt

    if crash_at == "rename":
        monkeypatch.setattr(io.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError):
            io.atomic_write_json(target, {"v": 2})
    else:
        with pytest.raises(KeyboardInterrupt):
            io.atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_replace_block_replaces_only_its_own_block_and_appends_a_missing_one(tmp_path):
    from diffopsearch.io import replace_block

    p = tmp_path / "B.md"
    replace_block(p, "<!-- a:begin -->", "<!-- a:end -->", "<!-- a:begin -->\none\n<!-- a:end -->\n")
    assert p.read_text() == "<!-- a:begin -->\none\n<!-- a:end -->\n"
    p.write_text("# head\n\n<!-- a:begin -->\none\n<!-- a:end -->\n\ntail\n")
    replace_block(p, "<!-- a:begin -->", "<!-- a:end -->", "<!-- a:begin -->\ntwo\n<!-- a:end -->")
    assert p.read_text() == "# head\n\n<!-- a:begin -->\ntwo\n<!-- a:end -->\n\ntail\n"
    replace_block(p, "<!-- b:begin -->", "<!-- b:end -->", "<!-- b:begin -->\nnew\n<!-- b:end -->")
    assert p.read_text() == "# head\n\n<!-- a:begin -->\ntwo\n<!-- a:end -->\n\ntail\n\n<!-- b:begin -->\nnew\n<!-- b:end -->\n"
