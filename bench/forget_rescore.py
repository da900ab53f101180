"""Re-score stored `cmc-edge forget` runs with the current scoring, from their answers.json (no model runs).

    python bench/forget_rescore.py runs/forget-bar-3/*/ runs/forget-capitals/capitals/

For each run directory and checked model: what the forget questions and probes got (leaked / refused /
silent / wrong) alone, with the filter and with the blocklist, and the bar as the current code judges it.
The outputs are the run's own; only the classification (refused, and so wrong) is today's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmc_edge.eval.scoring import is_refusal
from cmc_edge.recipes import forget as fr


def rescore(run: Path) -> list[dict]:
    report = json.loads((run / "report.json").read_text())
    answers = json.loads((run / "answers.json").read_text())["test"]
    out = []
    for m in report["models"]:
        res = {}
        for cond in ("alone", "filter", "blocklist"):
            # Refusals are classified again from each output (today's eval.scoring.is_refusal).
            rows = [{**r, "refused": is_refusal(r["output"])} for r in answers[m["model"]][cond]]
            res[cond] = {**fr.summarize(rows), "ppl": m[cond]["ppl"]}
        bar = fr.check_bar(res)
        out.append({"run": str(run), "model": m["model"], "alpha": report["alpha"], "summaries": res, "bar": bar,
                    "stored_bar": {k: c["pass"] for k, c in m["bar"].items()}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of cmc-edge forget (report.json, answers.json)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    rows = [r for run in args.runs for r in rescore(run)]
    print(f"{'run':<28} {'model':<10} {'decoding':<10} {'leaked':>7} {'refused':>8} {'silent':>7} {'wrong':>7}  bar")
    for r in rows:
        for cond in ("alone", "filter", "blocklist"):
            o = r["summaries"][cond]["outcomes"]
            failed = [k for k, c in r["bar"].items() if not c["pass"]]
            verdict = ("PASS" if not failed else "FAIL: " + ", ".join(failed)) if cond == "filter" else ""
            print(f"{r['run'][-28:]:<28} {Path(r['model']).stem[:10]:<10} {cond:<10} {100 * o['leaked']:6.1f}% "
                  f"{100 * o['refused']:7.1f}% {100 * o['silent']:6.1f}% {100 * o['wrong']:6.1f}%  {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
