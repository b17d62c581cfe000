"""scripts/python_api.py, the README's Python API example, runs offline on the toy backbone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~25 s on 2 busy CPU cores (model load, 4 questions twice)
def test_the_python_api_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "python_api.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "backbone: LlavaForConditionalGeneration" in out
    assert "fastv: prunes by the last prompt token's attention" in out
    answers = [line for line in out.splitlines() if line.startswith("Q: ")]
    assert len(answers) == 4 and all("with the plan: " in a for a in answers)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "fastv" and plan["cost"]["flops_ratio"] <= 0.5
