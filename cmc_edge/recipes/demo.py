"""`cmc-edge demo`: the capital-city unlearning filter, made by the forget recipe from one facts file.

The demo is ``cmc-edge forget`` on a packaged facts file (:data:`CAPITAL_FACTS`: the capitals of 6
countries to forget and of 35 to keep, all known to both packaged models), with SmolLM2-135M-Instruct
as the template and Gemma 3 270M (another family, another vocabulary) as the checked model. Nothing
in it is specific to capitals: :mod:`cmc_edge.recipes.forget` builds the data, trains, exports,
chooses the strength on its validation split and checks the filter on its test split. On top of
the recipe's own bar (issue 17: strict, and beside a blocklist) the demo prints its own, the bar
from the project's first issue, and exits 1 when that fails.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

CAPITAL_FACTS = Path(str(resources.files("cmc_edge") / "data" / "capitals.jsonl"))

# The bar from the project's foundation issue, checked and printed at the end of every run.
BAR = {
    "forget_drop_rel": 0.80,       # forget recall falls by >= 80% relative
    "retain_points": 10.0,         # recall of the kept facts within 10 points of the model's own
    "unrelated_points": 15.0,      # recall of never-trained general facts falls by at most 15 points
    "ppl_rise": 0.10,              # general-text perplexity rises < 10%
}


@dataclass(frozen=True)
class DemoConfig:
    out_root: Path = Path("runs")
    steps: int | None = None              # None: the forget recipe's default (120 with --quick)
    seed: int = 0
    quick: bool = False                   # fewer steps, no probe battery
    models: tuple[str, ...] = ("smollm2", "gemma3")    # the template first
    facts: Path = CAPITAL_FACTS

    def forget_config(self):
        from cmc_edge.recipes.forget import ForgetConfig

        steps = self.steps if self.steps is not None else 120 if self.quick else ForgetConfig.steps
        return ForgetConfig(template=self.models[0], check_models=tuple(self.models[1:]), steps=steps,
                            seed=self.seed, probes=not self.quick)


def check_bar(model: dict) -> dict:
    """The demo's bar on one model of the forget report: the model alone against it with the filter."""
    a, f = model["alone"], model["filter"]
    drop = 1 - f["forget"] / a["forget"] if a["forget"] else float("nan")
    keep, general = 100 * (f["keep"] - a["keep"]), 100 * (f["general"] - a["general"])
    rise = f["ppl"] / a["ppl"] - 1
    checks = {"forget_drop_rel": (drop, drop >= BAR["forget_drop_rel"]),
              "retain_points": (keep, abs(keep) <= BAR["retain_points"]),
              "unrelated_points": (general, -general <= BAR["unrelated_points"]),
              "ppl_rise": (rise, rise < BAR["ppl_rise"])}
    return {k: {"value": v, "pass": bool(ok)} for k, (v, ok) in checks.items()}


def format_bar(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        c = row["bar"]

        def ok(k):
            return "PASS" if c[k]["pass"] else "FAIL"

        lines.append(f"{row['model']}: forget drop {100 * c['forget_drop_rel']['value']:.0f}% (>=80%: "
                     f"{ok('forget_drop_rel')}), kept {c['retain_points']['value']:+.1f} pts (within 10: "
                     f"{ok('retain_points')}), general {c['unrelated_points']['value']:+.1f} pts (at most -15: "
                     f"{ok('unrelated_points')}), perplexity {100 * c['ppl_rise']['value']:+.1f}% (<10%: "
                     f"{ok('ppl_rise')})")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    """``cmc-edge forget`` on the capital facts into ``<run dir>/filter``, then the demo's bar.
    Returns the result (also ``results.json`` in a new run directory under ``cfg.out_root``)."""
    from cmc_edge.recipes.forget import run_forget
    from cmc_edge.recipes.scaffold import jsonable, new_run_dir

    run_dir = new_run_dir(cfg.out_root, "demo")
    report = run_forget(cfg.facts, run_dir / "filter", cfg.forget_config())
    rows = [{"model": m["model"], "bar": check_bar(m)} for m in report["models"]]
    table = (f"{report['table']}\n\nThe demo's bar (the model alone against it with the filter):\n"
             f"{format_bar(rows)}")
    result = {"config": jsonable(asdict(cfg)), "facts": str(cfg.facts),
              "models": rows, "forget_verdict": report["verdict"], "warnings": report["warnings"],
              "alpha": report["alpha"], "alphas": {m["model"]: m["alpha"] for m in report["models"]},
              "table": table, "bundle": report["bundle"], "report": str(run_dir / "filter" / "report.json"),
              "timings": {**{f"{k}_s": v for k, v in report["timings"].items() if k != "total"},
                          "total_s": report["timings"]["total"]},
              "run_dir": str(run_dir)}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
