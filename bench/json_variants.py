"""Variants of the JSON recipe's training data, judged on the same held-out questions as a full run.

Re-uses a `cmc-edge demo --recipe json` run directory (its template answers in ``sft.jsonl``, its
``eval_items.json`` and its models' baselines in ``results.json``), rebuilds the training records
as ``--variant`` says, trains and exports a delta beside it, and prints JSON adherence and
correctness with the delta for each model and alpha (greedy, 48 new tokens, as the recipe does):

    python bench/json_variants.py --run runs/json-<stamp> --name mixed --variant mixed
    python bench/json_variants.py --run runs/json-<stamp> --name steps400 --train '{"steps": 400}'
    python bench/json_variants.py --run runs/json-<stamp> --name kl2 --train '{"keep_l2": 1e-5}'

``--train`` takes any TrainConfig field (``steps``, ``kl_weight``, ``shift_l2``, ``keep_l2``, ...).

Variants: ``default`` (the recipe's records), ``keepall`` (every answer word kept, KL to the
template), ``mixed`` (every other record ``keepall``), ``teacher`` (every answer word kept, held to the
template's predictions in its own free-form answer: the record's ``teacher`` text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def rebuild(records: list[dict], variant: str) -> list[dict]:
    from cmc_edge.recipes.json_recipe import train_record

    out = []
    for i, r in enumerate(records):
        content = json.loads(r["response"])["answer"]
        if variant == "keepall" or (variant == "mixed" and i % 2 == 0):
            r = {"prompt": r["prompt"], "response": r["response"], "keep": [json.dumps(content, ensure_ascii=False)[1:-1]]}
        elif variant == "teacher":          # every answer word kept, held to the template's free-form answer
            r = train_record(r["prompt"], content)
        out.append(r)
    return out


def main() -> int:
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.json_recipe import JsonRecipeConfig, score_answers
    from cmc_edge.recipes.scaffold import answer_all, train_and_export
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a `demo --recipe json` run directory")
    ap.add_argument("--name", required=True, help="the new run directory is runs/jvar-<name>")
    ap.add_argument("--variant", default="default", choices=["default", "keepall", "mixed", "teacher"])
    ap.add_argument("--train", default="{}", help='JSON overrides, e.g. {"steps": 400, "kl_weight": 3}')
    ap.add_argument("--alphas", default='{"smollm2": [1.0], "gemma3": [1.0, 0.8]}')
    ap.add_argument("--eval-only", action="store_true",
                    help="judge the bundle an earlier run of --name trained (other alphas), without training")
    args = ap.parse_args()
    base = {m["model"]: m["base"]["correct"] for m in json.loads((args.run / "results.json").read_text())["models"]}
    items = json.loads((args.run / "eval_items.json").read_text())
    run = Path("runs") / f"jvar-{args.name}"
    cfg, over = JsonRecipeConfig(), json.loads(args.train)
    fields = {k: over.pop(k) for k in ("steps", "kl_weight", "lr", "alpha", "seed") if k in over}
    cfg = dataclasses.replace(cfg, train_overrides={**cfg.train_overrides, **over}, **fields)
    if args.eval_only:
        bundle = run / "bundle"
        if not bundle.is_dir():
            ap.error(f"--eval-only: {bundle} does not exist (run without --eval-only first)")
    else:
        run.mkdir(parents=True, exist_ok=False)
        recs = [json.loads(line) for line in (args.run / "sft.jsonl").read_text().splitlines()]
        (run / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rebuild(recs, args.variant)))
        t0 = time.perf_counter()
        bundle = train_and_export(run, resolve_model("smollm2"), cfg.train_config(), roles=("sft",))
        print(f"trained and exported in {time.perf_counter() - t0:.0f} s")
    results = {}
    for model, alphas in json.loads(args.alphas).items():
        target = TargetLLM(resolve_model(model), n_ctx=1024, n_threads=2)
        engine = Engine(target, [Delta(bundle, target)])
        for alpha in alphas:
            answers = answer_all(engine, [it["question"] for it in items], alphas=[alpha], max_tokens=cfg.max_tokens)
            rows = score_answers(items, answers)
            adh = sum(r["adherent"] for r in rows) / len(rows)
            ok = sum(r["correct"] for r in rows) / len(rows)
            print(f"{args.name} {model} alpha {alpha}: adherence {100 * adh:.1f}%, correct {100 * ok:.1f}% "
                  f"({100 * (ok - base[model]):+.1f} pts against the model's own baseline)")
            results[f"{model}@{alpha}"] = rows
        engine.close()
    out = run / "variant_results.json"
    if args.eval_only and out.is_file():
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
