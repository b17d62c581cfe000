"""Model adaptations: where the operators of ``diffopsearch.operators`` meet a real model.

``patch.llava``: the reduced LLaVA forward (hard plans, the search's sites, generation on a reduced KV
cache) and ``apply_plan``. Imported on use, so ``import diffopsearch.patch`` stays cheap.
"""
