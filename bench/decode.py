"""Decode speed and memory: plain llama-cpp-python vs cmc-edge with a delta, side by side in one run.

Each run is a fresh subprocess (so resident memory is measured per configuration), greedy,
``--tokens`` new tokens with EOS ignored, ``--threads`` llama.cpp threads; plain and cmc-edge
runs alternate and the medians are compared.

    python bench/decode.py --bundle runs/<demo>/bundle --model smollm2 --model gemma3

Several ``--bundle`` are compared in the same rounds (plain, then each bundle), each against the
plain run of its round. ``--code DIR`` adds a run of the first bundle with cmc-edge imported from
another checkout (for example a ``git worktree`` of an older commit), so that a change to the
runtime is measured side by side with the code before it:

    git worktree add /tmp/before HEAD~1
    python bench/decode.py --bundle runs/<demo>/bundle --code /tmp/before --runs 11
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."

CHILD = r"""
import json, resource, sys, time
mode, model, bundle, tokens, threads, ngl, variant, temp, dthreads = sys.argv[1:10]
tokens, threads, ngl, temp, dthreads = int(tokens), int(threads), int(ngl), float(temp), int(dthreads)
from cmc_edge.models import resolve_model
path = resolve_model(model)
messages = [{"role": "user", "content": %r}]
if mode == "plain":
    from llama_cpp import Llama
    from cmc_edge.prompt import render_prompt
    from cmc_edge.runtime.target import TargetLLM
    probe = TargetLLM(path, n_ctx=64)
    prompt = render_prompt(probe.prompt_format(), messages); del probe
    llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_gpu_layers=ngl, verbose=False, seed=0)
    ptoks = llm.tokenize(prompt.encode(), add_bos=llm._model.add_bos_token(), special=True)
    t0 = time.perf_counter(); n = 0
    for tok in llm.generate(ptoks, temp=temp, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        n += 1
        if n >= tokens: break
    dt = time.perf_counter() - t0
else:
    from cmc_edge.runtime.engine import Delta, Engine, SamplingParams
    from cmc_edge.runtime.target import TargetLLM
    target = TargetLLM(path, n_ctx=1024, n_threads=threads, n_gpu_layers=ngl)
    eng = Engine(target, [Delta(bundle, target, variant=None if variant == "default" else variant, threads=dthreads)])
    tgt, dps = eng.chat_prompts(messages)
    # ignore EOS the way the plain loop does: stop only at the token budget
    target.is_eog = lambda t: False
    t0 = time.perf_counter()
    gen = eng.generate(tgt, SamplingParams(max_tokens=tokens, temperature=temp, top_k=40, seed=0), delta_prompts=dps)
    gen.read(); n = len(gen.tokens)
    dt = time.perf_counter() - t0
    full_steps = gen.full_shift_steps
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": n, "seconds": dt, "tok_s": n / dt, "max_rss_mb": rss,
                  "full_shift_steps": full_steps if mode != "plain" else 0}))
""" % PROMPT


def run_once(mode, model, bundle, tokens, threads, ngl, variant, temperature=0.0, delta_threads=1, code=None):
    env = None
    if code is not None:                    # import cmc_edge from that checkout instead of this one
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(code).resolve()), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, model, str(bundle), str(tokens), str(threads), str(ngl),
                          variant, str(temperature), str(delta_threads)], capture_output=True, text=True, check=True,
                         env=env, cwd=code)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True,
                    help="delta bundle (repeatable: several bundles are compared in the same rounds)")
    ap.add_argument("--model", action="append", default=None, help="packaged name or GGUF path (repeatable)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--variant", default="default", choices=["default", "fp32", "int8"],
                    help="the delta graph (default: the runtime's, INT8 where the bundle has one)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (the issue's setting); > 0 samples with top-k 40, top-p 0.95, min-p 0.05")
    ap.add_argument("--delta-threads", type=int, default=1, help="onnxruntime threads for the delta step")
    ap.add_argument("--code", action="append", default=[], type=Path,
                    help="another cmc-edge checkout to run the first bundle with, in the same rounds (repeatable)")
    args = ap.parse_args()
    for c in args.code:
        if not (c / "cmc_edge" / "__init__.py").is_file():
            ap.error(f"--code {c}: no cmc_edge package there (give the root of a checkout, e.g. a git worktree)")
    args.bundle = [Path(b).resolve() for b in args.bundle]
    labels = [str(b) for b in args.bundle] + [f"code:{c}" for c in args.code]
    results = {}
    for model in args.model or ["smollm2", "gemma3"]:
        # one round: plain, then each bundle; every cmc-edge run is paired with the plain run of its round
        rows = {"plain": [], **{b: [] for b in labels}}
        for _ in range(args.runs):
            for mode in rows:
                code = Path(mode[5:]) if mode.startswith("code:") else None
                bundle = args.bundle[0] if mode == "plain" or code is not None else Path(mode)
                rows[mode].append(run_once("plain" if mode == "plain" else "cmc", model, bundle, args.tokens,
                                           args.threads, args.n_gpu_layers, args.variant, args.temperature,
                                           args.delta_threads, code))
        plain = {"tok_s": statistics.median(r["tok_s"] for r in rows["plain"]),
                 "max_rss_mb": statistics.median(r["max_rss_mb"] for r in rows["plain"])}
        results[model] = {}
        for b in labels:
            cmc = {"tok_s": statistics.median(r["tok_s"] for r in rows[b]),
                   "max_rss_mb": statistics.median(r["max_rss_mb"] for r in rows[b])}
            ratio = cmc["tok_s"] / plain["tok_s"]
            # each cmc-edge run against the plain run of its round: drifts of the box's speed over
            # minutes (plain llama.cpp alone moves by 10%) cancel within a pair
            paired = statistics.median(c["tok_s"] / p["tok_s"] for p, c in zip(rows["plain"], rows[b]))
            extra = cmc["max_rss_mb"] - plain["max_rss_mb"]
            full = sum(r["full_shift_steps"] for r in rows[b]) / max(1, sum(r["tokens"] for r in rows[b]))
            results[model][b] = {"median": {"plain": plain, "cmc": cmc}, "speed_ratio": ratio, "paired_ratio": paired,
                                 "extra_rss_mb": extra, "full_shift_share": full,
                                 "runs": {"plain": rows["plain"], "cmc": rows[b]}}
            label = f"  [{b}]" if len(labels) > 1 else ""
            print(f"{model:<8} plain {plain['tok_s']:7.1f} tok/s  cmc-edge {cmc['tok_s']:7.1f} tok/s  "
                  f"ratio {ratio:.3f} (paired {paired:.3f})   RSS plain {plain['max_rss_mb']:.0f} MB  cmc-edge "
                  f"{cmc['max_rss_mb']:.0f} MB  (+{extra:.0f} MB)  full-vocabulary shift on {100 * full:.1f}% "
                  f"of steps{label}")
    print(json.dumps({m: {b: {k: v for k, v in r.items() if k != "runs"} for b, r in per.items()}
                      for m, per in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
