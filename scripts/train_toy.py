"""Train the shipped toy backbone: python scripts/train_toy.py OUT_DIR [--steps N] [--seed S].

Resumes from OUT_DIR/checkpoint when interrupted. The shipped weights in
diffopsearch/assets/toy-llava were made by this script; its curve is OUT_DIR/train_log.jsonl.
"""
import argparse
from dataclasses import fields

from diffopsearch.backbone.train import TrainConfig, train

p = argparse.ArgumentParser()
p.add_argument("out_dir")
for f in fields(TrainConfig):
    p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
args = vars(p.parse_args())
out = args.pop("out_dir")
print(train(out, TrainConfig(**args)))
