"""``diffopsearch report dir=DIR``: every results.json below DIR in one report (:mod:`diffopsearch.report`)."""
from __future__ import annotations

from omegaconf import OmegaConf

from ..config import complete
from ..errors import UserError


def run(cfg) -> dict:
    from ..report import write_report

    cfg = complete(cfg, "report")
    # `report dir=X` or `report report.dir=X`; report.dir defaults to ${dir}, an error to read while dir is unset
    given = not OmegaConf.is_interpolation(cfg.report, "dir")
    root = cfg.report.dir if given else OmegaConf.select(cfg, "dir", default=None)
    if not root:
        raise UserError("report needs a directory: diffopsearch report dir=<a run, outputs/ or multirun/ directory>; "
                        "every results.json below it is collected.")
    res = write_report(str(root), cfg.report.out)
    return {"rows": len(res["rows"]), "failed": len(res["failed"]), "report": res["report"], "plot": res["plot"]}
