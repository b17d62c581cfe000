# %% [markdown]
# # diffopsearch from Python
#
# Load a backbone, make (or load) a reduction plan, apply it, and generate. Runs offline on the
# shipped toy backbone in a few seconds on a CPU (each `# %%` is a notebook cell):
#
#     python scripts/python_api.py [--out DIR] [--search]
#
# `--search` also runs a short search from Python (about a minute on 2 CPU cores). With a real
# backbone, replace "toy" by "llava-hf/llava-1.5-7b-hf" (and dtype="bfloat16" on a GPU).
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default=None, help="where plan.json goes (default: a temporary folder)")
parser.add_argument("--search", action="store_true", help="also search a plan (short run)")
args = parser.parse_args()
out = Path(args.out or tempfile.mkdtemp(prefix="diffopsearch-api-"))
out.mkdir(parents=True, exist_ok=True)

# %% Load the backbone: a (LlavaForConditionalGeneration, LlavaProcessor) pair
import diffopsearch  # noqa: E402

model, processor = diffopsearch.load_backbone("toy", device="cpu")
print(f"backbone: {type(model).__name__}, {model.config.text_config.num_hidden_layers} decoder layers")

# %% A few toy-world questions (GQA's schema; generated into ~/.cache/diffopsearch on first use)
from diffopsearch.data.datasets import load_qa  # noqa: E402

questions = load_qa("toy", limit=4)
records, images = questions.batch(range(4))

# %% A plan: FastV at 50% of the prefill FLOPs (any baseline: fastv tome pool prumerge visionzip random)
from diffopsearch.baselines import make_plan  # noqa: E402
from diffopsearch.evaluate import mean_prompt_text_tokens, visual_token_count  # noqa: E402

n_visual, grid = visual_token_count(model.config)
plan = make_plan("fastv", 0.5, model.config.text_config, n_visual, grid, mean_prompt_text_tokens(processor, questions))
plan.save(out / "plan.json")
plan = diffopsearch.load_plan(out / "plan.json")  # a searched plan.json loads the same way

from diffopsearch.show import describe  # noqa: E402

print(f"plan ({out / 'plan.json'}): FLOPs ratio {plan.cost['flops_ratio']:.3f}")
for line in describe(plan):
    print(f"  {line}")
print(f"  visual tokens per layer: {plan.visual_tokens_per_layer()}")

# %% Apply it and generate, with the prompt `diffopsearch eval` uses
import torch  # noqa: E402

from diffopsearch.data.prompts import format_prompt  # noqa: E402

reduced = diffopsearch.apply_plan(model, plan)  # wraps the model: no copy of the weights
for rec, image in zip(records, images):
    inputs = processor(images=image, text=format_prompt(rec["question"], processor), return_tensors="pt")
    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        short = reduced.generate(**inputs, max_new_tokens=4)
    n = inputs["input_ids"].shape[1]
    a_full, a_short = (processor.decode(x[0, n:], skip_special_tokens=True).strip() for x in (full, short))
    print(f"Q: {rec['question']}  gold: {rec['answer']}  unreduced: {a_full}  with the plan: {a_short}")

# %% Search a plan from Python (optional): the `diffopsearch search` command's own body
if args.search:
    from diffopsearch.config import compose
    from diffopsearch.commands.search import run

    cfg = compose("search", ["budget=0.5", "search.steps=20", "search.train_limit=256", "limit=100"])
    results = run(cfg, out_dir=out / "search")  # writes plan.json and results.json there
    searched = diffopsearch.load_plan(out / "search" / "plan.json")
    print(f"searched plan: FLOPs ratio {searched.cost['flops_ratio']:.3f}, accuracy {results['accuracy']:.3f}")
    for line in describe(searched):
        print(f"  {line}")
