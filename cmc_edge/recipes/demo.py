"""`cmc-edge demo`: the whole CMC pipeline on the packaged real models, as one reproducible run.

1. data: capital-city unlearning set from facts the template knows (forget / retain splits,
   several prompt forms each, other facts about the same countries, broad prompts whose targets
   are the template's own answers);
2. train an unlearning-filter delta beside SmolLM2-135M-Instruct (the template);
3. export it (ONNX fp32 + INT8 bundle);
4. map it to Gemma 3 270M (another family, another vocabulary) with PM-MinED;
5. evaluate both models with and without the filter on HELD-OUT prompt forms and print one table
   (also written as JSON under ``runs/``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cmc_edge.recipes.scaffold import RecipeConfig

log = logging.getLogger(__name__)

# The bar from the project's foundation issue, checked and printed at the end of every run.
BAR = {
    "forget_drop_rel": 0.80,       # forget recall falls by >= 80% relative
    "retain_points": 10.0,         # retain recall within 10 points of the model's own baseline
    "unrelated_points": 15.0,      # unrelated-knowledge recall within 15 points
    "ppl_rise": 0.10,              # general-text perplexity rises < 10%
}


@dataclass(frozen=True)
class DemoConfig(RecipeConfig):
    quick: bool = False
    n_forget: int = 6
    objective: str = "unlearn-idk"
    # Retain data held twice as hard as the default training's: at 1.0 the filter over-refused on
    # seed 2 (retain -29 / -23 points); at 2.0 seeds 2 and 3 (and 0) pass every bar (README).
    kl_weight: float = 2.0
    broad_tokens: int = 48
    avoid_in_retain: bool = True

    @property
    def default_steps(self) -> int:
        return 120 if self.quick else 300


def build_data(cfg: DemoConfig, template_path, run_dir: Path) -> dict:
    from cmc_edge.eval import demo_data as dd
    from cmc_edge.recipes.scaffold import template_answers, write_jsonl

    known = sorted(set(dd.KNOWN_COUNTRIES["smollm2"]) & set(dd.KNOWN_COUNTRIES["gemma3"]))
    split = dd.build_unlearning_split(known, n_forget=cfg.n_forget, seed=cfg.seed)
    train = dd.build_train_examples(split)
    broad = list(dd.BROAD_PROMPTS)
    t0 = time.perf_counter()
    answers = template_answers(template_path, broad, cfg.broad_tokens)
    log.info("template answered %d broad prompts in %.1fs", len(broad), time.perf_counter() - t0)
    forget = [{"prompt": e["prompt"], "response": e["response"],
               "avoid": list(dd.country_by_name(e["country"]).capital)} for e in train if e["tag"] == "forget"]
    # Other facts about a forgotten country stay (KL to the template), and its capital is avoided
    # there too: the filter learns "never this city around this country", not "refuse these wordings".
    retain = [{"prompt": e["prompt"], "response": e["response"],
               **({"avoid": list(dd.country_by_name(e["country"]).capital)}
                  if cfg.avoid_in_retain and e["country"] in split["forget"] else {})}
              for e in train if e["tag"] == "retain"]
    retain += [{"prompt": p, "response": a} for p, a in zip(broad, answers) if a]
    for name, rows in (("forget", forget), ("retain", retain)):
        write_jsonl(run_dir / f"{name}.jsonl", rows)
    items = dd.build_eval_items(split)
    if cfg.quick:
        items = items[::2]
    (run_dir / "eval_items.json").write_text(json.dumps(items, indent=1))
    return {"split": split, "items": items, "n_forget": len(forget), "n_retain": len(retain)}


def evaluate_model(name: str, model_path, bundle: Path, items: list[dict], alpha: float) -> dict:
    from cmc_edge.eval import demo_data as dd
    from cmc_edge.eval.runner import perplexity, recall_eval, tokens_per_second
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(model_path, n_ctx=1024, n_threads=2)
    t0 = time.perf_counter()
    delta = Delta(bundle, target, alpha=alpha)
    map_s = time.perf_counter() - t0
    engine = Engine(target, [delta])
    out = {"model": name, "variant": delta.variant, "map_seconds": round(map_s, 2),
           "map_kind": "identity" if delta.map.is_identity else "pm-mined"}
    text = "\n\n".join(dd.GENERAL_TEXT)
    for cond, a in (("base", 0.0), ("filtered", alpha)):
        res = recall_eval(engine, items, alphas=[a], desc=f"{name} {cond}")
        out[cond] = {split: {"recall": r.recall, "correct": r.correct, "total": r.total,
                             "samples": [list(s) for s in r.samples]} for split, r in res.items()}
        out[cond]["tokens_per_s"] = tokens_per_second(res)
        out[cond]["perplexity"] = perplexity(engine, text, alphas=[a])
    engine.close()
    return out


def check_bar(row: dict) -> dict:
    b, f = row["base"], row["filtered"]
    drop = 1 - f["forget"]["recall"] / b["forget"]["recall"] if b["forget"]["recall"] else float("nan")
    checks = {
        "forget_drop_rel": (drop, drop >= BAR["forget_drop_rel"]),
        "retain_points": (100 * (f["retain"]["recall"] - b["retain"]["recall"]),
                          100 * abs(f["retain"]["recall"] - b["retain"]["recall"]) <= BAR["retain_points"]),
        "unrelated_points": (100 * (f["unrelated"]["recall"] - b["unrelated"]["recall"]),
                             100 * (b["unrelated"]["recall"] - f["unrelated"]["recall"]) <= BAR["unrelated_points"]),
        "ppl_rise": (f["perplexity"] / b["perplexity"] - 1, f["perplexity"] / b["perplexity"] - 1 < BAR["ppl_rise"]),
    }
    return {k: {"value": v, "pass": bool(ok)} for k, (v, ok) in checks.items()}


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<9} {'filter':<8} {'forget':>8} {'retain':>8} {'unrelated':>10} {'ppl':>8} {'tok/s':>7}")
    lines = [head, "-" * len(head)]
    for row in rows:
        for cond in ("base", "filtered"):
            r = row[cond]
            lines.append(f"{row['model']:<9} {'on' if cond == 'filtered' else 'off':<8} "
                         f"{100 * r['forget']['recall']:>7.1f}% {100 * r['retain']['recall']:>7.1f}% "
                         f"{100 * r['unrelated']['recall']:>9.1f}% {r['perplexity']:>8.2f} {r['tokens_per_s']:>7.1f}")
    lines.append("")
    for row in rows:
        c = row["bar"]
        lines.append(f"{row['model']}: forget drop {100 * c['forget_drop_rel']['value']:.0f}% (>=80%: "
                     f"{'PASS' if c['forget_drop_rel']['pass'] else 'FAIL'}), retain {c['retain_points']['value']:+.1f} pts "
                     f"({'PASS' if c['retain_points']['pass'] else 'FAIL'}), unrelated {c['unrelated_points']['value']:+.1f} pts "
                     f"({'PASS' if c['unrelated_points']['pass'] else 'FAIL'}), perplexity {100 * c['ppl_rise']['value']:+.1f}% "
                     f"({'PASS' if c['ppl_rise']['pass'] else 'FAIL'})")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo in a new run directory under ``cfg.out_root``; returns the result (also
    ``results.json``, with the chart ``results.png``): the table, each model's rows and bar check."""
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import Stopwatch, new_run_dir, train_and_export

    sw = Stopwatch()
    run_dir = new_run_dir(cfg.out_root, "demo")
    paths = {m: resolve_model(m) for m in cfg.models}
    template_path = paths["smollm2"]
    with sw("data_s"):
        data = build_data(cfg, template_path, run_dir)
    with sw("train_export_s"):
        bundle = train_and_export(run_dir, template_path, cfg.train_config())
    rows = []
    for name in cfg.models:
        with sw(f"eval_{name}_s"):
            row = evaluate_model(name, paths[name], bundle, data["items"], cfg.alpha)
            row["bar"] = check_bar(row)
        rows.append(row)
    timings = {**sw.seconds, "total_s": sw.total}
    table = format_table(rows)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "split": data["split"], "train_examples": {"forget": data["n_forget"], "retain": data["n_retain"]},
              "eval_items": len(data["items"]), "models": rows, "timings": timings, "table": table,
              "bundle": str(bundle), "run_dir": str(run_dir)}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot_demo(result, run_dir / "results.png")
    return result


def plot_demo(result: dict, path: str | Path) -> Path:
    """Recall per split, filter off vs on, one panel per model (the chart the README shows). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmc_edge.eval.evaluate import save_png

    splits = ("forget", "retain", "unrelated")
    rows = result["models"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.4 * len(rows), 3.3), squeeze=False, sharey=True)
    for ax, row in zip(axes[0], rows):
        x = range(len(splits))
        for off, (cond, label, color) in enumerate((("base", "filter off", "#999999"), ("filtered", "filter on", "#d9534f"))):
            ys = [100 * row[cond][s]["recall"] for s in splits]
            bars = ax.bar([i + (off - 0.5) * 0.38 for i in x], ys, width=0.38, label=label, color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ppl = f"ppl {row['base']['perplexity']:.1f} -> {row['filtered']['perplexity']:.1f}"
        ax.set_title(f"{row['model']}  ({ppl})", fontsize=9)
        ax.set_xticks(list(x), [f"{s}\nrecall" for s in splits], fontsize=8)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("% of held-out questions answered")
    axes[0][0].legend(fontsize=7, loc="upper right")
    return save_png(fig, path)
