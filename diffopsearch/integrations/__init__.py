"""Integrations with other tools. Each one is imported only when that tool asks for it.

- :mod:`.lmms_eval`: ``lmms-eval --model diffopsearch --model_args pretrained=...,plan=plan.json``
  (extra ``diffopsearch[lmms]``). lmms-eval finds the model through the entry point
  ``lmms_eval.models: diffopsearch = diffopsearch.integrations:lmms_eval_manifest`` declared in
  pyproject.toml, which names the class without importing it.
"""
from __future__ import annotations

LMMS_MODEL_ID = "diffopsearch"
LMMS_CLASS_PATH = "diffopsearch.integrations.lmms_eval.DiffopsearchLlava"


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ModelManifest for ``--model diffopsearch``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_ID, simple_class_path=LMMS_CLASS_PATH)
