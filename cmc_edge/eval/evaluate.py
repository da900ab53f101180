"""`cmc-edge eval`: what a delta does to each LLM, on the user's own question file, side by side.

Items are JSONL records ``{"question": ..., "answers": [...], "reference": ..., "split": ...}``:
``answers`` (aliases; recall = one appears in the greedy output) and/or ``reference`` (a reference
answer: ROUGE-L recall of the output against it, and the mean negative log-likelihood per token of
the reference teacher-forced through the combined model, a judge-free instruction-following
measure). ``split`` groups items (for example "forget", "retain"); default "eval". Every model is
run at alpha 0 (the model itself) and at each given alpha.

Each row at alpha != 0 is compared with the same model at alpha 0, and damage the delta does to
everything else is flagged in the table (and logged as a WARNING): perplexity on ``--text`` up by
more than 10% (``PPL+x%``), or the share of refusals among all outputs up by more than 20 points
(``REFUSALS x%``, x the share at that alpha), the two ways an unlearning filter has been seen to
collapse (issue 17).

>>> round(rouge_l_recall("the capital is Paris", "Paris is the capital of France"), 3)   # "the capital"
0.333
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from cmc_edge.errors import InputError
from cmc_edge.eval.scoring import normalize_words

log = logging.getLogger(__name__)

# When a row is flagged: its perplexity rises by more than this fraction, or its refusal share by
# more than this many points, over the same model at alpha 0.
FLAG_LIMITS = {"ppl_rise": 0.10, "refusal_points": 20.0}


_LINE_FIX = ('each line must be a JSON object with a "question" string and "answers" (a list of strings) '
             'and/or "reference" (a string); "split" is optional')


def _bad(path, line, what: str) -> InputError:
    return InputError(f"{path}:{line}: {what}", fix=_LINE_FIX)


def read_eval_items(path: str | Path) -> list[dict]:
    from cmc_edge.artifacts import read_json_lines

    items = []
    for lineno, obj in read_json_lines(path, "evaluation file", _LINE_FIX):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise _bad(path, lineno, 'a non-empty "question" string is required')
        answers, ref = obj.get("answers"), obj.get("reference")
        if answers is not None and (not isinstance(answers, list) or not answers
                                    or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise _bad(path, lineno, '"answers" must be a non-empty list of non-empty strings')
        if ref is not None and not (isinstance(ref, str) and ref.strip()):
            raise _bad(path, lineno, '"reference" must be a non-empty string')
        if answers is None and ref is None:
            raise _bad(path, lineno, 'give "answers" and/or "reference" to score the output against')
        items.append({"question": obj["question"], "answers": answers, "reference": ref,
                      "split": str(obj.get("split", "eval"))})
    return items


def rouge_l_recall(candidate: str, reference: str) -> float:
    """Longest common word subsequence / reference length (words normalised as for recall)."""
    c, r = normalize_words(candidate), normalize_words(reference)
    if not r:
        return float("nan")
    prev = [0] * (len(c) + 1)
    for rw in r:
        cur = [0]
        for j, cw in enumerate(c, 1):
            cur.append(prev[j - 1] + 1 if rw == cw else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1] / len(r)


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate(bundle, models: list[str], items: list[dict], alphas: list[float], *, text: str | None = None,
             max_tokens: int = 48, n_threads: int | None = None, progress: bool = True,
             variant: str | None = None) -> dict:
    """Run every model at alpha 0 and at each alpha with the bundle's ``variant`` graph ("fp32",
    "int8", None: the runtime's default); return ``{"rows": [...], "samples": {...}}``."""
    from cmc_edge.eval.runner import perplexity
    from cmc_edge.eval.scoring import answer_recalled, is_refusal
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import answer_all, tokens_per_second
    from cmc_edge.runtime.engine import Delta, Engine, check_alpha
    from cmc_edge.runtime.target import TargetLLM

    alphas = [0.0] + [check_alpha(a) for a in alphas if a != 0.0]
    rows, samples, used = [], {}, variant
    for name in models:
        path = resolve_model(name)
        target = TargetLLM(path, n_ctx=2048, n_threads=n_threads)
        delta = Delta(bundle, target, variant=variant)
        used = delta.variant
        engine = Engine(target, [delta])
        for a in alphas:
            answers = answer_all(engine, [it["question"] for it in items], alphas=[a], max_tokens=max_tokens,
                                 desc=f"{path.stem} alpha={a:g}" if progress else None)
            per_split: dict[str, dict] = {}
            for it, ans in zip(items, answers):
                s = per_split.setdefault(it["split"], {"recalled": [], "rouge_l": [], "nll": [], "refused": []})
                s["refused"].append(is_refusal(ans.text))
                if it["answers"]:
                    s["recalled"].append(answer_recalled(ans.text, it["answers"]))
                if it["reference"]:
                    s["rouge_l"].append(rouge_l_recall(ans.text, it["reference"]))
                    msgs = [{"role": "user", "content": it["question"]}]
                    s["nll"].append(float(engine.score_reply(msgs, it["reference"], alphas=[a]).mean()))
            outs = [{"question": it["question"], "split": it["split"], "output": ans.text}
                    for it, ans in zip(items, answers)]
            row = {"model": path.stem, "alpha": a, "tokens_per_s": tokens_per_second(answers),
                   "splits": {k: {"recall": (sum(v["recalled"]) / len(v["recalled"])) if v["recalled"] else None,
                                  "rouge_l_recall": _mean(v["rouge_l"]) if v["rouge_l"] else None,
                                  "reference_nll": _mean(v["nll"]) if v["nll"] else None,
                                  "refusal_rate": sum(v["refused"]) / len(v["refused"]),
                                  "n": len(v["recalled"]) or len(v["rouge_l"])} for k, v in per_split.items()},
                   "refusal_rate": sum(is_refusal(a.text) for a in answers) / len(answers) if answers else float("nan")}
            if text:
                row["perplexity"] = perplexity(engine, text, alphas=[a])
            rows.append(row)
            samples[f"{path.stem}@{a:g}"] = outs
        engine.close()
    flag_rows(rows)
    return {"rows": rows, "samples": samples, "alphas": alphas, "items": len(items), "bundle": str(bundle),
            "variant": used, "flag_limits": dict(FLAG_LIMITS), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def flag_rows(rows: list[dict], limits: dict = FLAG_LIMITS) -> list[dict]:
    """Set each row's ``flags``: what the delta broke against the same model at alpha 0 (see the
    module doc); a WARNING is logged for each. Rows at alpha 0, and rows whose model has none, get
    no flags. Returns ``rows``.

    >>> rows = [{"model": "m", "alpha": 0.0, "perplexity": 20.0, "refusal_rate": 0.05},
    ...         {"model": "m", "alpha": 1.0, "perplexity": 30.0, "refusal_rate": 0.9}]
    >>> [r["flags"] for r in flag_rows(rows)]
    [[], ['PPL+50%', 'REFUSALS 90%']]
    """
    base = {r["model"]: r for r in rows if r["alpha"] == 0.0}
    for r in rows:
        r["flags"] = []
        b = base.get(r["model"])
        if r["alpha"] == 0.0 or b is None:
            continue
        ppl, ppl0 = r.get("perplexity"), b.get("perplexity")
        if ppl is not None and ppl0 is not None and ppl0 > 0 and ppl / ppl0 - 1 > limits["ppl_rise"]:
            r["flags"].append(f"PPL+{100 * (ppl / ppl0 - 1):.0f}%")
        ref, ref0 = r.get("refusal_rate"), b.get("refusal_rate")
        if ref is not None and ref0 is not None and 100 * (ref - ref0) > limits["refusal_points"]:
            r["flags"].append(f"REFUSALS {100 * ref:.0f}%")
        if r["flags"]:
            log.warning("%s at alpha %g damages what it should leave alone: %s (alpha 0: perplexity %s, "
                        "refusals %s)", r["model"], r["alpha"], ", ".join(r["flags"]),
                        "-" if ppl0 is None else f"{ppl0:.2f}", "-" if ref0 is None else f"{100 * ref0:.0f}%")
    return rows


def format_eval_table(result: dict) -> str:
    splits = sorted({s for r in result["rows"] for s in r["splits"]})
    head = f"{'model':<28} {'alpha':>5}" + "".join(
        f" {s[:10] + ' rec':>14} {s[:8] + ' rougeL':>15} {s[:8] + ' nll':>12}" for s in splits)
    head += f" {'ppl':>8} {'tok/s':>7}  flags"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        cells = ""
        for s in splits:
            v = r["splits"].get(s, {})
            rec, rl, nll = v.get("recall"), v.get("rouge_l_recall"), v.get("reference_nll")
            cells += (f" {'-' if rec is None else f'{100 * rec:.1f}%':>14} {'-' if rl is None else f'{rl:.3f}':>15}"
                      f" {'-' if nll is None else f'{nll:.3f}':>12}")
        ppl = r.get("perplexity")
        lines.append(f"{r['model'][:28]:<28} {r['alpha']:>5g}{cells} {'-' if ppl is None else f'{ppl:.2f}':>8} "
                     f"{r['tokens_per_s']:>7.1f}  {', '.join(r.get('flags') or ()) or '-'}")
    return "\n".join(lines)


def plot_eval(result: dict, path: str | Path) -> Path:
    """One panel per metric (recall, ROUGE-L recall, reference NLL, perplexity), alpha on the x axis,
    a line per model and split. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("recall", "recall"), ("rouge_l_recall", "ROUGE-L recall"), ("reference_nll", "reference NLL / token")]
    rows = result["rows"]
    splits = sorted({s for r in rows for s in r["splits"]})
    panels = [(k, t) for k, t in metrics if any(r["splits"].get(s, {}).get(k) is not None for r in rows for s in splits)]
    if any(r.get("perplexity") is not None for r in rows):
        panels.append(("perplexity", "perplexity"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for model in dict.fromkeys(r["model"] for r in rows):
            mr = [r for r in rows if r["model"] == model]
            xs = [r["alpha"] for r in mr]
            if key == "perplexity":
                ax.plot(xs, [r["perplexity"] for r in mr], marker="o", label=model)
                continue
            for s in splits:
                ys = [r["splits"].get(s, {}).get(key) for r in mr]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=f"{model} {s}")
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    from cmc_edge.artifacts import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
