"""`cmc-edge` command line: one function per verb, a dict from verb to handler.

Heavy imports happen inside the handlers, so `cmc-edge --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cmc_edge import __version__
from cmc_edge.errors import CmcError


def _add_target_args(p):
    p.add_argument("--model", "-m", default="smollm2",
                   help="target GGUF file, or a packaged model name: smollm2, gemma3 (default: smollm2)")
    p.add_argument("--delta", "-d", action="append", default=[], metavar="BUNDLE",
                   help="delta bundle directory, or NAME=DIR to name it (default name: the directory's); "
                        "repeat for several deltas")
    p.add_argument("--alpha", "-a", action="append", type=float, default=None,
                   help="alpha per delta, in --delta order (default: each bundle's own); 0 disables")
    p.add_argument("--no-delta", action="store_true", help="run the plain model (for comparison)")
    _add_variant_args(p)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama.cpp's choice)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (llama.cpp CUDA build)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template overriding the GGUF's")


def _add_variant_args(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp32", action="store_true", help="run the delta's exact fp32 graph (default: its INT8 graph "
                   "where the bundle has one, the faster step)")
    g.add_argument("--int8", action="store_true", help="require the delta's INT8 graph (an error if the bundle has none)")


def _variant(args) -> str | None:
    return "fp32" if args.fp32 else "int8" if args.int8 else None


def _add_sampling_args(p):
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")


def _sampling(args):
    from cmc_edge.runtime.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                          seed=args.seed, stop=tuple(args.stop))


def build_engine(args):
    from cmc_edge.runtime.engine import build_engine as build

    return build(args.model, [] if args.no_delta else args.delta,
                 alphas=None if args.no_delta else args.alpha, n_ctx=args.n_ctx, n_threads=args.threads,
                 n_gpu_layers=args.n_gpu_layers, seed=getattr(args, "seed", None) or 0, variant=_variant(args))


def cmd_generate(args) -> int:
    params = _sampling(args)
    with build_engine(args) as engine:
        if args.raw:                         # the operator's own text: its special tokens are parsed
            gen = engine.generate(args.prompt, params)
        else:
            gen = engine.chat([{"role": "user", "content": args.prompt}], params, chat_template=args.chat_template)
        for chunk in gen:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{len(gen.tokens)} tokens, {gen.tokens_per_s:.1f} tok/s, finish: {gen.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    with build_engine(args) as engine:
        return _chat_loop(engine, args)


def _chat_loop(engine, args) -> int:
    params = _sampling(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("cmc-edge chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        gen = engine.chat(history, params, chat_template=args.chat_template)
        for chunk in gen:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": gen.text})
    return 0


def cmd_train(args) -> int:
    from cmc_edge.train.data import encode_records, read_jsonl
    from cmc_edge.train.loop import TrainConfig, train
    from cmc_edge.train.template import load_template

    cfg = TrainConfig(objective=args.objective, alpha=args.alpha, size=args.size, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight, max_len=args.max_len,
                      avoid_margin=args.avoid_margin, shift_l2=args.shift_l2, keep_l2=args.keep_l2,
                      retain_l2=args.retain_l2,
                      embed_init=args.embed_init,
                      delta_ends_turn=args.delta_ends_turn,
                      seed=args.seed, device=args.device, cache_template=not args.no_cache,
                      save_every=args.save_every, grad_accum=args.grad_accum)
    files = {"sft": args.data, "forget": args.forget, "retain": args.retain}
    records = {role: read_jsonl(f) for role, f in files.items() if f}  # validate before the slow template load
    if cfg.objective == "sft" and "sft" not in records:
        raise CmcError("the sft objective needs --data FILE.jsonl", fix="pass --data, or pick an unlearn-* objective")
    if cfg.objective.startswith("unlearn") and "forget" not in records:
        raise CmcError(f"--objective {cfg.objective} needs --forget FILE.jsonl", fix="pass --forget (and --retain)")
    if Path(args.out).exists() and not args.overwrite:    # train() checks too, but after the slow template load
        raise CmcError(f"{args.out} already exists", fix="choose another --out or pass --overwrite")
    tpl = load_template(args.template, device=args.device)
    data = {role: encode_records(recs, tpl.tokenizer, tpl.prompt_format, role, cfg.max_len)
            for role, recs in records.items()}
    out = train(tpl, data, cfg, args.out, overwrite=args.overwrite, resume=args.resume)
    print(f"delta checkpoint: {out}")
    # Under torchrun every rank runs this command; rank 0 wrote the checkpoint and checks it.
    if cfg.objective.startswith("unlearn") and not args.no_drift_check and os.environ.get("RANK", "0") == "0":
        _drift_check(tpl, out)
    return 0


def _drift_check(tpl, checkpoint) -> None:
    """Print the checkpoint's drift table; loud warnings when it damages unrelated text."""
    from cmc_edge.train.drift import ADVICE, check_checkpoint_drift, format_drift

    report = check_checkpoint_drift(tpl, checkpoint, log_warnings=False)
    print(format_drift(report))
    print(f"(every answer in {Path(checkpoint) / 'drift.json'})")
    for w in report["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    if report["warnings"]:
        print(f"WARNING: {ADVICE}", file=sys.stderr)


def cmd_export(args) -> int:
    from cmc_edge.export import export_bundle

    out = export_bundle(args.checkpoint, args.out, int8=not args.no_int8, tolerance=args.tolerance,
                        overwrite=args.overwrite, graph=args.graph)
    print(f"delta bundle: {out}")
    return 0


def _read_text(path: str, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise CmcError(f"{flag} file {p} not found", fix=f"pass an existing UTF-8 text file to {flag}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CmcError(f"{flag} file {p} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                       fix="re-save the file as UTF-8") from exc


def cmd_map(args) -> int:
    from cmc_edge.models import cache_dir, resolve_model
    from cmc_edge.runtime.bundle import load_bundle
    from cmc_edge.tokenmap import (cached_token_map, explain, map_stats, read_gguf_vocab,
                                   read_tokenizer_json, save_token_map)

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise CmcError(f"{args.out} already exists", fix="choose another --out or pass --overwrite")
    sample_text = _read_text(args.sample_text, "--sample-text") if args.stats and args.sample_text else None
    bundle = load_bundle(args.delta)
    target_path = resolve_model(args.model)
    dvocab = read_tokenizer_json(bundle.tokenizer_path)
    tm = cached_token_map(target_path, dvocab, cache_dir() / "maps")
    if args.out:
        save_token_map(tm, args.out)
        print(f"token map: {args.out}")
    if args.stats or args.lookup:
        tvocab = read_gguf_vocab(target_path)
        if args.stats:
            sample = None
            if sample_text is not None:
                from cmc_edge.runtime.target import TargetLLM
                sample = TargetLLM(target_path, n_ctx=256).tokenize(sample_text, add_bos=False)
            print(json.dumps(map_stats(tm, tvocab, dvocab, sample), indent=2))
        for item in args.lookup:
            key = int(item) if item.isdigit() else item
            print(explain(tm, tvocab, dvocab, key))
    return 0


def cmd_inspect(args) -> int:
    from cmc_edge.runtime.bundle import load_bundle

    b = load_bundle(args.bundle)
    print(json.dumps(b.manifest, indent=2))
    return 0


def cmd_eval(args) -> int:
    from cmc_edge.artifacts import write_json
    from cmc_edge.eval.evaluate import evaluate, format_eval_table, plot_eval, read_eval_items

    items = read_eval_items(args.items)   # validate before loading any model
    text = _read_text(args.text, "--text") if args.text else None
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise CmcError(f"{out} already exists", fix="choose another --out or pass --overwrite")
    result = evaluate(args.delta, args.model or ["smollm2"], items, args.alpha or [1.0], text=text,
                      max_tokens=args.max_tokens, n_threads=args.threads, variant=_variant(args))
    print(format_eval_table(result))
    if out is not None:
        write_json(out, result)
        chart = plot_eval(result, Path(args.chart) if args.chart else out.with_suffix(".png"))
        print(f"\nwrote {out} and {chart}")
    elif args.chart:
        print(f"\nwrote {plot_eval(result, args.chart)}")
    return 0


def cmd_demo(args) -> int:
    if args.recipe == "json":
        from cmc_edge.recipes.json_recipe import JsonRecipeConfig, run_json_recipe

        res = run_json_recipe(JsonRecipeConfig(out_root=Path(args.out), steps=args.steps, seed=args.seed))
    elif args.recipe == "instruct":
        from cmc_edge.recipes.instruct import InstructConfig, run_instruct_recipe

        res = run_instruct_recipe(InstructConfig(out_root=Path(args.out), steps=args.steps, seed=args.seed))
        print(res["table"])
        print(f"\nbundle: {res['bundle']}\nIFEval: python bench/ifeval.py --model gemma3 --delta {res['bundle']} "
              f"--config base --config delta --limit 40")
        print(f"run directory: {res['run_dir']}  (total {res['timings']['total_s'] / 60:.1f} min)")
        return 0
    else:
        from cmc_edge.recipes.demo import DemoConfig, run_demo

        res = run_demo(DemoConfig(out_root=Path(args.out), steps=args.steps, seed=args.seed, quick=args.quick))
        for w in res["warnings"]:
            print(f"WARNING: {w}", file=sys.stderr)
    print(res["table"])
    print(f"\nrun directory: {res['run_dir']}  (total {res['timings']['total_s'] / 60:.1f} min)")
    return 0 if all(c["pass"] for row in res["models"] for c in row["bar"].values()) else 1


def cmd_forget(args) -> int:
    from cmc_edge.recipes.forget import ForgetConfig, run_forget

    keep_prompts = ()
    if args.keep_prompts:
        keep_prompts = tuple(line.strip() for line in _read_text(args.keep_prompts, "--keep-prompts").splitlines()
                             if line.strip())
    cfg = ForgetConfig(template=args.template, check_models=tuple(args.check_model), steps=args.steps,
                       seed=args.seed, probes=not args.no_probes, keep_prompts=keep_prompts,
                       system_prompt_baseline=args.system_prompt_baseline,
                       side_by_side=args.side_by_side, shift_floor=args.shift_floor, prose_retain=args.prose_retain,
                       alpha_per_model=args.alpha_per_model,
                       **({"retain_l2": args.retain_l2} if args.retain_l2 is not None else {}),
                       **({"alphas": tuple(args.alpha)} if args.alpha else {}))
    res = run_forget(args.facts, args.out, cfg, overwrite=args.overwrite)
    print(res["table"])
    print(f"\nfilter bundle: {res['bundle']}  (report: {Path(args.out) / 'report.txt'}, report.json, report.png; "
          f"{res['timings']['total'] / 60:.1f} min)")
    if res["verdict"] == "FAIL":
        print("\nWARNING: the filter did not pass its own check; read the report before using it.", file=sys.stderr)
    elif res["verdict"] != "PASS":
        print("\nWARNING: the filter does no measured damage, but no checked model knew the forgotten facts, so "
              "its forgetting is not verified.", file=sys.stderr)
    for w in res["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    return 0 if res["verdict"] == "PASS" else 1


def cmd_serve(args) -> int:
    import dataclasses

    from cmc_edge.runtime.policy import build_policies
    from cmc_edge.runtime.server import ServerLimits, ServerSettings, serve

    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          request_timeout_s=args.request_timeout, max_queue=args.max_queue,
                          max_body_bytes=args.max_body_bytes)
    settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key, limits=limits,
                              allow_raw_prompts=args.allow_raw_prompts)     # checks the address before the slow load
    engine = build_engine(args)
    try:
        policies = build_policies(engine.deltas, enforce=args.enforce, optional=args.optional)
    except BaseException:
        engine.close()
        raise
    source = {d.name: d.alpha_source for d in engine.deltas}
    for p in policies:
        print(f"delta {p.name}: alpha {p.alpha:g} ({source.get(p.name, 'given')}), {p.mode}"
              + (f" (requests may not go below {p.min_alpha:g})" if p.mode == "enforced" else ""), file=sys.stderr)
    settings = dataclasses.replace(settings, model_name=engine.target.path.stem, policies=policies)
    return serve(engine, settings)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cmc-edge", description="Cross-model Control for local GGUF LLMs: train a tiny "
                                 "delta once, steer any llama.cpp model with it.")
    ap.add_argument("--version", action="version", version=f"cmc-edge {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the packaged models: train an unlearning filter "
                                    "on SmolLM2, transfer it to Gemma 3, print the table")
    p.add_argument("--out", default="runs", help="where the run directory goes (default: runs/)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (fewer steps, no probe battery; "
                                                        "unlearn only)")
    p.add_argument("--recipe", choices=["unlearn", "json", "instruct"], default="unlearn",
                   help="unlearn: the capital-city unlearning filter, made by `cmc-edge forget` from a packaged "
                        "facts file (default); json: instruction transfer, "
                        "answering as one JSON object; instruct: following IFEval-style constraints (needs the "
                        "[bench] extra: IFEval's checker)")

    from cmc_edge.recipes.forget import ForgetConfig   # light: the recipe imports torch and llama.cpp lazily

    fdef = ForgetConfig()                               # the recipe's defaults, shown and used as they are
    p = sub.add_parser("forget", help="make an unlearning filter from a facts file: build the data, train, export, "
                                      "choose its strength and check it; writes the bundle and a report card")
    p.add_argument("facts", help='JSONL: {"question", "answer", "aliases": [...], "split": "forget"|"keep", '
                                 '"subject", "paraphrases": [...]} (see README, "Unlearning your own facts")')
    p.add_argument("--out", "-o", required=True, help="directory to write: bundle/, checkpoint/, report.*")
    p.add_argument("--template", default=fdef.template,
                   help=f"template GGUF or packaged name (default: {fdef.template})")
    p.add_argument("--check-model", action="append", default=[], metavar="MODEL",
                   help="also check the filter on this GGUF or packaged model (repeatable), e.g. gemma3")
    p.add_argument("--keep-prompts", help="text file, one prompt per line: more prompts whose answers must not change")
    p.add_argument("--steps", type=int, default=fdef.steps, help=f"training steps (default: {fdef.steps})")
    p.add_argument("--alpha", action="append", type=float, default=None,
                   help="candidate strengths the recipe chooses from on its validation split (repeatable; "
                        f"default: {', '.join(f'{a:g}' for a in fdef.alphas)})")
    p.add_argument("--retain-l2", type=float, default=None,
                   help="weight of the flat-shift penalty where the filter must be silent (see train --retain-l2; "
                        f"default: {fdef.retain_l2:g}; 0 turns it off)")
    p.add_argument("--shift-floor", type=float, default=fdef.shift_floor, metavar="NATS",
                   help="shifts smaller than this are dropped at decode time, recorded in the bundle "
                        f"(default: {fdef.shift_floor:g}; 0 keeps every shift)")
    p.add_argument("--prose-retain", action=argparse.BooleanOptionalAction, default=None,
                   help="also hold the filter silent on plain prose (the template's broad answers as documents). "
                        "Default: only when the first filter validates short of the bar or unsafe on the template, "
                        "or unsafe on a --check-model; then a second filter continues the first with it (about 2 "
                        "minutes more) and ships if it is safer on the checked models or validates better on the "
                        "template. --prose-retain: always (one training); --no-prose-retain: never")
    p.add_argument("--alpha-per-model", action="store_true",
                   help="choose the strength on validation on every checked model, not only on the template, and "
                        "record each in the bundle for that model file (the runtime runs it there); by default "
                        "every model runs at the template's strength")
    p.add_argument("--no-probes", action="store_true", help="skip the probe battery in the report (faster)")
    p.add_argument("--system-prompt-baseline", action="store_true",
                   help="also measure, on the same items, each checked model told in a system prompt which "
                        "questions not to answer (never their answers): what a user tries first; 1-2.5 "
                        "minutes more")
    p.add_argument("--side-by-side", type=int, default=fdef.side_by_side, metavar="N",
                   help="prompts answered at once in the recipe's own answers and checks "
                        f"(default: {fdef.side_by_side}, 1.2-1.6x faster than 1 on 2 cores; 1: one by one)")
    p.add_argument("--seed", type=int, default=fdef.seed)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="train a delta beside a frozen template")
    p.add_argument("--template", default="smollm2", help="template GGUF, packaged name or HF directory")
    p.add_argument("--objective", default="sft", choices=["sft", "unlearn-idk", "unlearn-gd"])
    p.add_argument("--data", help="JSONL of prompt/response, alpaca or chat records (sft)")
    p.add_argument("--forget", help="JSONL forget set (unlearning)")
    p.add_argument("--retain", help="JSONL retain set (unlearning; KL to the template)")
    p.add_argument("--out", "-o", required=True, help="checkpoint directory to write")
    p.add_argument("--size", default="15m", choices=["tiny", "15m", "42m", "110m"])
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--avoid-margin", type=float, default=16.0,
                   help='unlearning: how far (nats) the delta must push down tokens that begin a record\'s "avoid" strings')
    p.add_argument("--shift-l2", type=float, default=0.0,
                   help="weight of a penalty on the spread of the delta's logits: keeps it flat (silent) on tokens "
                        "no example needs moved, so other LLMs get no arbitrary push there")
    p.add_argument("--keep-l2", type=float, default=0.0,
                   help='the same penalty on the words inside "keep" spans only (sft records)')
    p.add_argument("--retain-l2", type=float, default=0.0,
                   help="the same penalty on retain records only (unlearning: silent there for every token, "
                        "not only those the template considers)")
    p.add_argument("--delta-ends-turn", action="store_true",
                   help="train the delta to end replies itself (the template's end-of-turn scores are masked): "
                        "for behaviours whose end must transfer to LLMs with other chat formats")
    p.add_argument("--save-every", type=int, default=50,
                   help="write resume state to OUT.resume/ every N steps (0: never); SIGINT/SIGTERM also save it")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.resume/")
    p.add_argument("--embed-init", default="template", choices=["template", "random"],
                   help="delta token embeddings: SVD projection of the template's (default) or random")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--no-cache", action="store_true", help="recompute template log-probs every step")
    p.add_argument("--no-drift-check", action="store_true",
                   help="unlearning: skip the check after training (perplexity of held-out prose, general-question "
                        "recall and refusals, template vs template + delta; written to OUT/drift.json)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="export a delta checkpoint to an ONNX bundle (fp32 + INT8)")
    p.add_argument("checkpoint")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |ONNX - PyTorch| accepted")
    p.add_argument("--graph", choices=["auto", "fused", "fused-mha", "torch"], default="auto",
                   help="graph writer: onnxruntime's fused operators (fused: GroupQueryAttention with an in-place "
                        "KV cache, the fast CPU form; fused-mha: MultiHeadAttention, which the CUDA provider runs in "
                        "float32), or torch.onnx.export (auto: fused where it covers the delta)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("map", help="build (or show) the PM-MinED token map from a GGUF to a delta")
    p.add_argument("--model", "-m", required=True, help="target GGUF or packaged name")
    p.add_argument("--delta", "-d", required=True, help="delta bundle")
    p.add_argument("--out", "-o", help="also save the map here (.npz)")
    p.add_argument("--stats", action="store_true", help="print coverage statistics")
    p.add_argument("--sample-text", help="text file for frequency-weighted coverage")
    p.add_argument("--lookup", action="append", default=[], help="explain how a token id or text maps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    for verb, helptext in (("generate", "generate text with a GGUF steered by deltas"),
                           ("chat", "interactive chat with a GGUF steered by deltas")):
        p = sub.add_parser(verb, help=helptext)
        _add_target_args(p)
        _add_sampling_args(p)
        if verb == "generate":
            p.add_argument("prompt")
            p.add_argument("--raw", action="store_true", help="complete the prompt as-is (no chat template)")
        else:
            p.add_argument("--system", default=None)

    p = sub.add_parser("serve", help="OpenAI-compatible server on localhost")
    _add_target_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="required when --host is not a loopback address")
    p.add_argument("--max-prompt-tokens", type=int, default=1536)
    p.add_argument("--max-tokens-limit", type=int, default=512)
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop a generation that runs longer (waiting included): HTTP 504, or an SSE error event "
                        "mid-stream (default: 120)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait for the model; more get HTTP 429 with Retry-After (default: 16)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--enforce", action="append", default=[], metavar="NAME[=MIN_ALPHA]",
                   help="requests cannot switch this delta off, invert it, or lower its alpha below MIN_ALPHA "
                        "(default: its alpha); unlearning bundles are enforced by default (repeatable)")
    p.add_argument("--optional", action="append", default=[], metavar="NAME",
                   help="requests may set this delta's alpha, 0 switching it off; the default for bundles not "
                        "trained to unlearn (repeatable)")
    p.add_argument("--allow-raw-prompts", action="store_true",
                   help="parse special tokens in /v1/completions prompts (trusted clients only: it lets them "
                        "write any control token); chat message contents are always plain text")

    p = sub.add_parser("eval", help="score a delta on your own questions: each model at alpha 0 and at each --alpha")
    p.add_argument("--delta", "-d", required=True, metavar="BUNDLE")
    p.add_argument("--model", "-m", action="append", default=None, help="GGUF path or packaged name (repeatable)")
    p.add_argument("--items", required=True, help='JSONL: {"question", "answers": [...] and/or "reference", "split"}')
    p.add_argument("--alpha", "-a", action="append", type=float, default=None, help="repeatable (default 1.0)")
    p.add_argument("--text", help="UTF-8 text file for perplexity")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    _add_variant_args(p)
    p.add_argument("--out", "-o", help="write the results (table rows and every output) as JSON, and a PNG chart "
                                         "next to it")
    p.add_argument("--chart", help="where to write the PNG chart (default: --out with .png)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("inspect", help="verify a delta bundle and print its manifest")
    p.add_argument("bundle")
    return ap


HANDLERS = {
    "demo": cmd_demo, "forget": cmd_forget, "train": cmd_train, "export": cmd_export, "map": cmd_map, "generate": cmd_generate,
    "chat": cmd_chat, "serve": cmd_serve, "inspect": cmd_inspect, "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return HANDLERS[args.verb](args)
    except CmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
