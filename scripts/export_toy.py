"""Export a training checkpoint of the toy backbone into the package's asset directory.

python scripts/export_toy.py RUN_DIR [--test-images N]

Loads RUN_DIR/checkpoint/model.safetensors into the toy classes, measures unreduced accuracy on
the world's test split (greedy first token = exact match for one-word answers), and writes a
from_pretrained directory to diffopsearch/assets/toy-llava with training.json (seed, recipe,
steps, validation and test accuracy) beside the weights. A run started from another one
(``--init``) is the last phase of a chain; training.json records every phase's command.
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffopsearch.backbone import toy
from diffopsearch.backbone.train import evaluate_first_token
from diffopsearch.data import world
from diffopsearch.io import atomic_write_json



def command(run_dir: Path, config: dict) -> str:
    return "python scripts/train_toy.py " + str(run_dir) + " " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in config.items() if v != "")


def curve(run_dir: Path) -> list:
    last = {}
    for line in open(run_dir / "train_log.jsonl"):
        r = json.loads(line)
        last[r["step"]] = r  # resumed runs log a step twice; the later record wins
    return [{"step": s, **last[s]["val"]} for s in sorted(last) if "val" in last[s]]


p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--test-images", type=int, default=1000)
args = p.parse_args()
run = Path(args.run_dir)
state = json.loads((run / "checkpoint" / "state.json").read_text())
model = toy.build_model(seed=state["config"]["seed"])
missing, unexpected = model.load_state_dict(load_file(run / "checkpoint" / "model.safetensors"), strict=False)
assert not unexpected, unexpected
processor = toy.build_processor()
scenes, rows = world.generate_split("test", args.test_images, seed=0)
by_id = {s.image_id: s for s in scenes}
torch.set_num_threads(2)
test = evaluate_first_token(model.eval(), processor.tokenizer, [(by_id[r["imageId"]], r) for r in rows])
print("test", json.dumps(test))
tmp = Path(tempfile.mkdtemp(prefix=".toy-llava.", dir=toy.ASSET_DIR.parent if toy.ASSET_DIR.parent.exists() else None))
toy.ASSET_DIR.parent.mkdir(parents=True, exist_ok=True)
model.save_pretrained(tmp)
processor.save_pretrained(tmp)
# a run started from another (--init) is one phase of a chain: record every phase, the first first
phases, at = [], run
while True:
    cfg = json.loads((at / "checkpoint" / "state.json").read_text())
    phases.insert(0, {"run": str(at), "steps": cfg["step"], "recipe": cfg["config"],
                      "command": command(at, cfg["config"]), "validation_curve": curve(at)})
    if not cfg["config"].get("init"):
        break
    at = Path(cfg["config"]["init"])
atomic_write_json(tmp / "training.json", {
    "seed": state["config"]["seed"], "steps": sum(p["steps"] for p in phases), "recipe": state["config"],
    "command": " && ".join(p["command"] for p in phases), "phases": phases,
    "test": {"images": args.test_images, "questions": len(rows), **test},
    "validation_curve": phases[-1]["validation_curve"],
})
if toy.ASSET_DIR.exists():
    shutil.rmtree(toy.ASSET_DIR)
tmp.rename(toy.ASSET_DIR)
print("wrote", toy.ASSET_DIR)
