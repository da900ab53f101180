"""Two builds of llama-cpp-python answering the same prompts, alternated in one run.

    python bench/llama_build.py WHEEL_A WHEEL_B --model smollm2 --rounds 2

Each wheel is unpacked into a temporary folder and imported from there by a child process that
answers the recipes' never-trained general questions side by side (the forget recipe's answering
loop, ``recipes.scaffold.answer_all``), greedy, the same token budget: prompt processing (one
token) and full answers, timed separately. The builds run A, B, A, B, ... so that a slow minute of
a shared machine falls on both. Prints the median seconds of each and the ratio, and how many
answers are token-identical (other kernels round differently and can break a near tie).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import llama_cpp
from cmc_edge.eval.demo_data import UNRELATED_QUESTIONS
from cmc_edge.models import resolve_model
from cmc_edge.recipes.scaffold import answer_all, template_engine
model, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qs = [q for q, *_ in UNRELATED_QUESTIONS]
qs = [qs[i % len(qs)] + ("" if i < len(qs) else " Please answer briefly.") for i in range(n)]
eng = template_engine(resolve_model(model))
out = {"llama_cpp": llama_cpp.__file__, "system": llama_cpp.llama_print_system_info().decode().strip()}
answer_all(eng, qs[:8], max_tokens=2, side_by_side=8)            # warm-up
for name, mt in (("prompt_s", 1), ("answer_s", max_tokens)):
    t0 = time.perf_counter()
    got = answer_all(eng, qs, max_tokens=mt, side_by_side=8)
    out[name] = time.perf_counter() - t0
out["tokens"] = sum(a.tokens for a in got)
out["answers"] = [list(a.ids) for a in got]
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs=2, help="two llama_cpp_python-*.whl files (A, B)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for label, wheel in zip("AB", args.wheels):
            dirs[label] = Path(tmp) / label
            with zipfile.ZipFile(wheel) as z:
                z.extractall(dirs[label])
        for r in range(args.rounds):
            for label in "AB":
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dirs[label]), str(repo)])}
                p = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.prompts), str(args.max_tokens)],
                                   env=env, capture_output=True, text=True, check=True)
                row = json.loads(p.stdout.strip().splitlines()[-1])
                if not row["llama_cpp"].startswith(str(dirs[label])):
                    raise SystemExit(f"build {label} imported llama_cpp from {row['llama_cpp']}, not its wheel")
                runs[label].append(row)
                print(f"round {r + 1} {label}: prompts {row['prompt_s']:.1f} s, answers {row['answer_s']:.1f} s "
                      f"({row['tokens']} tokens)", flush=True)
    res = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
           "wheels": {k: Path(w).name for k, w in zip("AB", args.wheels)}}
    for label in "AB":
        res[label] = {"system": runs[label][0]["system"],
                      **{k: round(statistics.median(x[k] for x in runs[label]), 2) for k in ("prompt_s", "answer_s")}}
    for k in ("prompt_s", "answer_s"):
        res[f"{k}_ratio_A_over_B"] = round(res["A"][k] / res["B"][k], 2)
    a, b = runs["A"][0]["answers"], runs["B"][0]["answers"]
    res["identical"] = f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"
    print(json.dumps({k: v for k, v in res.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
