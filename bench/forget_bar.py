"""Issue 17's bar, through the user-level command only: `cmc-edge forget FACTS --out DIR --check-model gemma3`
for each facts file, on the defaults, then one table of the report cards side by side.

    python bench/forget_bar.py bench/forget_sets/science.jsonl bench/forget_sets/books.jsonl --out runs/forget-bar

Each run directory keeps its bundle, report.txt, report.json (every answer in answers.json) and report.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("facts", nargs="+", help="facts files (JSONL)")
    ap.add_argument("--out", default=f"runs/forget-bar-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--check-model", action="append", default=None, help="default: gemma3")
    ap.add_argument("--extra", default="", help="extra arguments for cmc-edge forget, as one string")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("cmc-edge")
    rows = []
    for facts in args.facts:
        run = out / Path(facts).stem
        cmd = [str(exe), "forget", facts, "--out", str(run)]
        for m in args.check_model or ["gemma3"]:
            cmd += ["--check-model", m]
        cmd += args.extra.split()
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        rep = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
        rows.append({"facts": facts, "rc": rc, "wall_s": round(time.time() - t0, 1), "report": rep})
    (out / "summary.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    print()
    print(f"{'facts':<12} {'model':<10} {'alpha':>5} {'forget':>14} {'probes':>14} {'keep':>8} {'general':>8} "
          f"{'ppl':>7} {'wrong f/b':>10} {'bar':>5} {'min':>5}")
    for r in rows:
        rep = r["report"]
        if rep is None:
            print(f"{Path(r['facts']).stem:<12} failed (exit {r['rc']})")
            continue
        for m in rep["models"]:
            a, f, b = m["alone"], m["filter"], m["blocklist"]
            ok = all(c["pass"] for c in m["bar"].values())
            print(f"{Path(r['facts']).stem:<12} {Path(m['model']).stem[:10]:<10} {m.get('alpha', rep['alpha']):>5g} "
                  f"{100 * a['forget']:5.1f}->{100 * f['forget']:5.1f}% {100 * a.get('probe', float('nan')):5.1f}->"
                  f"{100 * f.get('probe', float('nan')):5.1f}% {100 * (f['keep'] - a['keep']):+7.1f} "
                  f"{100 * (f['general'] - a['general']):+7.1f} {100 * (f['ppl'] / a['ppl'] - 1):+6.1f}% "
                  f"{100 * f['outcomes']['wrong']:4.0f}/{100 * b['outcomes']['wrong']:<4.0f} "
                  f"{'PASS' if ok else 'FAIL':>5} {r['wall_s'] / 60:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
