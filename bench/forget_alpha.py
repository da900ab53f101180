"""Re-check a `cmc-edge forget` run's filter at another strength, on the same test items.

The report card's "alone" and "blocklist" rows do not depend on alpha; only the filter's answers
are generated again, then the bar is checked as the report does:

    python bench/forget_alpha.py runs/forget-bar-2/books 0.5 gemma3 smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    from cmc_edge.eval.demo_data import GENERAL_TEXT
    from cmc_edge.eval.runner import perplexity
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes import forget as fr
    from cmc_edge.recipes.scaffold import answer_all
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a cmc-edge forget output directory")
    ap.add_argument("alpha", type=float)
    ap.add_argument("models", nargs="+", help="models checked in that run (packaged names)")
    args = ap.parse_args()
    run = Path(args.run)
    tests = json.loads((run / "answers.json").read_text())["test"]
    check_tokens = json.loads((run / "report.json").read_text())["config"]["check_tokens"]
    for name in args.models:
        rows = tests[name]
        items = [{k: v for k, v in r.items() if k not in ("output", "recalled", "refused")} for r in rows["alone"]]
        target = TargetLLM(resolve_model(name), n_ctx=1024, n_threads=2)
        engine = Engine(target, [Delta(run / "bundle", target)])
        got = answer_all(engine, [it["prompt"] for it in items], alphas=[args.alpha], max_tokens=check_tokens,
                         desc=f"{name} alpha {args.alpha:g}")
        res = {"alone": fr.summarize(rows["alone"]), "filter": fr.summarize(fr.score(items, got)),
               "blocklist": fr.summarize(rows["blocklist"])}
        text = "\n\n".join(GENERAL_TEXT)
        res["alone"]["ppl"] = perplexity(engine, text, alphas=[0.0])
        res["filter"]["ppl"] = perplexity(engine, text, alphas=[args.alpha])
        engine.close()
        bar = fr.check_bar(res)
        print(f"{name} alpha {args.alpha:g}: " + ", ".join(
            f"{k} {c['value']:+.3f} {'PASS' if c['pass'] else 'FAIL'}" for k, c in bar.items())
            + f"; refused / wrong {100 * res['filter']['outcomes']['refused']:.0f} / "
              f"{100 * res['filter']['outcomes']['wrong']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
