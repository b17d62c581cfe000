"""The answer cache never outlives what made its answers: the code, the weights, the data files."""
from __future__ import annotations

import logging

import pytest

import fixtures as fx
from diffopsearch import evaluate as ev
from diffopsearch import fingerprint
from diffopsearch.data.datasets import load_qa


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_model()


def _generated(tmp_path, model, proc, ds, cache):
    r = ev.evaluate(model, proc, None, ds, batch_size=4, max_new_tokens=2, cache_path=str(cache) + "/",
                    out_dir=tmp_path / "run", show=False, latency_batches=0)
    return r["throughput"]["generated"], r["throughput"]["cached"]


def test_a_new_code_version_recomputes_with_one_warning(tmp_path, tiny, monkeypatch, caplog):
    model, proc = tiny
    ds = load_qa("gqa", str(fx.write_gqa(tmp_path / "GQA", n_images=3, per_image=2)))
    cache = tmp_path / "answers"
    assert _generated(tmp_path, model, proc, ds, cache) == (6, 0)
    assert _generated(tmp_path, model, proc, ds, cache) == (0, 6)       # same code: all cached
    monkeypatch.setattr(fingerprint, "code_version", lambda: "999.0")   # an upgrade
    with caplog.at_level(logging.WARNING, logger="diffopsearch"):
        assert _generated(tmp_path, model, proc, ds, cache) == (6, 0)
    assert sum("another version of diffopsearch" in r.getMessage() for r in caplog.records) == 1


def test_changed_source_or_data_files_change_the_fingerprints(tmp_path, monkeypatch):
    before = fingerprint.code_fingerprint()
    fingerprint._source_hash.cache_clear()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(fingerprint, "_PACKAGE", pkg)
    one = fingerprint._source_hash()
    fingerprint._source_hash.cache_clear()
    (pkg / "a.py").write_text("x = 2\n")
    assert fingerprint._source_hash() != one
    fingerprint._source_hash.cache_clear()
    monkeypatch.undo()
    assert fingerprint.code_fingerprint() == before

    root = fx.write_gqa(tmp_path / "GQA", n_images=2, per_image=1)
    ds = load_qa("gqa", str(root))
    fp = fingerprint.dataset_fingerprint(ds)
    assert fp and fp == fingerprint.dataset_fingerprint(ds)
    victim = next(p for p in sorted(root.rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert fingerprint.dataset_fingerprint(ds) != fp


def test_weight_files_change_the_model_fingerprint(tmp_path, tiny):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    model.name_or_path = str(tmp_path / "m")
    try:
        fp = fingerprint.model_fingerprint(model)
        assert fp.startswith("files:")
        w = tmp_path / "m" / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
        assert fingerprint.model_fingerprint(model) != fp
    finally:
        model.name_or_path = ""
