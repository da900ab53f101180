"""Answering many prompts side by side (Engine.generate_many) against one by one, in one run.

    python bench/side_by_side.py --model smollm2 --delta runs/<run>/filter/bundle --n 8 --prompts 80

The same questions (the never-trained general questions the recipes check with), greedy, the same
token budget, with the delta at alpha 0 and at its own alpha: wall time one by one, wall time side
by side, their ratio, and how many answers are token-identical (llama.cpp's batched arithmetic can
break a near tie the other way).
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    from cmc_edge.eval.demo_data import UNRELATED_QUESTIONS
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import answer_all
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--delta", help="a delta bundle (its own alpha is the second row)")
    ap.add_argument("--n", type=int, default=8, help="prompts side by side")
    ap.add_argument("--prompts", type=int, default=80, help="how many questions (cycled)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    qs = [q for q, *_ in UNRELATED_QUESTIONS]
    qs = [qs[i % len(qs)] + ("" if i < len(qs) else " Please answer briefly.") for i in range(args.prompts)]
    target = TargetLLM(resolve_model(args.model), n_ctx=1024, n_threads=2)
    deltas = [Delta(args.delta, target)] if args.delta else []
    eng = Engine(target, deltas)
    rows = []
    for alpha in ([0.0, deltas[0].alpha] if deltas else [None]):
        alphas = None if alpha is None else [alpha]
        got = {}
        for n in (1, args.n):
            t0 = time.perf_counter()
            got[n] = answer_all(eng, qs, alphas=alphas, max_tokens=args.max_tokens, side_by_side=n)
            got[n] = (got[n], time.perf_counter() - t0)
        (one, t1), (many, tn) = got[1], got[args.n]
        same = sum(a.text == b.text for a, b in zip(one, many))
        rows.append({"model": args.model, "alpha": alpha or 0.0, "prompts": len(qs), "side_by_side": args.n,
                     "one_by_one_s": round(t1, 1), "side_by_side_s": round(tn, 1), "speedup": round(t1 / tn, 2),
                     "tokens": [sum(a.tokens for a in one), sum(a.tokens for a in many)], "identical": same})
        print(f"{args.model} alpha {alpha or 0:g}: one by one {t1:.1f} s, {args.n} side by side {tn:.1f} s "
              f"({t1 / tn:.2f}x); identical answers {same}/{len(qs)}", flush=True)
    eng.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
