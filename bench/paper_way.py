"""The paper's way of decoding versus cmc-edge's, side by side on the same prompts (issue 6 item 4).

Paper style: the target LLM in PyTorch fp32 (dequantized from the same GGUF through transformers)
with its KV cache, the delta in PyTorch fp32 recomputed over its whole re-tokenized text at every
step (what the reference implementation does when the two tokenizations can diverge), combined as
``log_softmax(target) + alpha * delta[map]``, greedy.
cmc-edge: the quantized GGUF in llama.cpp, the ONNX delta (fp32 and INT8) on its own KV cache with
rollback re-sync, the shift added in place; greedy.

    python bench/paper_way.py --run runs/json-YYYYmmdd-HHMMSS --model smollm2 --model gemma3

Prints tokens/s for each and the ratio cmc-edge / paper, per model. Both use 2 threads. Both
generate exactly ``--tokens`` tokens, end-of-turn ignored (as in ``bench/decode.py``): a base model
such as Gemma 3 270M often ends its reply after a token or two, and tokens/s over such replies
measures the prompt pass, not decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = (
    "Explain how to make a cup of tea.",
    "What is the largest planet in our solar system?",
    "Write a short poem about the sea.",
)


def paper_generate(target, tok, delta, dtok, dmap, tgt_prompt, delta_prompt, alpha, n_tokens, eos_ids):
    import torch

    from cmc_edge.combine import combine_torch

    ids = tok(tgt_prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out, past, gen_ids = target(input_ids=ids, use_cache=True), None, []
    past = out.past_key_values
    logits = out.logits[0, -1]
    for _ in range(n_tokens):
        text = tok.decode(gen_ids)
        dids = dtok(delta_prompt + text, return_tensors="pt", add_special_tokens=False).input_ids
        dl = delta(input_ids=dids).logits[0, -1]                                 # recomputed in full
        dl = dl - dl.mean()
        shift = dl[dmap[0]] * dmap[1] if dmap is not None else dl[: logits.shape[0]]
        scores = combine_torch(torch.log_softmax(logits.float(), -1), shift, alpha)
        nxt = int(scores.argmax())
        if nxt in eos_ids:
            break
        gen_ids.append(nxt)
        out = target(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return gen_ids


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmc_edge.models import resolve_model
    from cmc_edge.runtime.engine import Delta, Engine, SamplingParams
    from cmc_edge.runtime.target import TargetLLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a demo run directory (checkpoint/ and bundle/)")
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = args.model or ["smollm2", "gemma3"]
    delta = AutoModelForCausalLM.from_pretrained(args.run / "checkpoint", dtype=torch.float32).eval()
    dtok = AutoTokenizer.from_pretrained(args.run / "checkpoint")
    rows = []
    for name in models:
        path = resolve_model(name)
        llm = TargetLLM(path, n_ctx=1024, n_threads=2)
        engines = {v: Engine(llm, [Delta(args.run / "bundle", llm, variant=v, alpha=args.alpha)]) for v in ("fp32", "int8")}
        d0 = engines["fp32"].deltas[0]
        dmap = None if d0.map.is_identity else (torch.from_numpy(d0.map.index.astype("int64")),
                                                torch.from_numpy(d0.map.mask.astype("float32")))
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        target = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        eos = set()                                    # fixed-length replies (see the module docstring)
        llm.is_eog = lambda t: False
        speed = {"paper": [], "fp32": [], "int8": []}
        for q in PROMPTS:
            msgs = [{"role": "user", "content": q}]
            tgt, dps = engines["fp32"].chat_prompts(msgs)
            with torch.no_grad():
                t0 = time.perf_counter()
                ids = paper_generate(target, tok, delta, dtok, dmap, tgt, dps[0], args.alpha, args.tokens, eos)
                speed["paper"].append(len(ids) / (time.perf_counter() - t0))
            for v, eng in engines.items():
                g = eng.generate(tgt, SamplingParams(max_tokens=args.tokens, temperature=0.0), delta_prompts=dps)
                g.read()
                speed[v].append(len(g.tokens) / g.seconds)
        med = {k: statistics.median(v) for k, v in speed.items()}
        rows.append((name, med))
        for eng in engines.values():
            eng.close()
        del target
    print(f"\n{'model':<9} {'paper (torch fp32)':>19} {'cmc-edge fp32':>14} {'ratio':>6} {'cmc-edge INT8':>14} {'ratio':>6}")
    for name, m in rows:
        print(f"{name:<9} {m['paper']:>15.1f} t/s {m['fp32']:>10.1f} t/s {m['fp32'] / m['paper']:>5.1f}x "
              f"{m['int8']:>10.1f} t/s {m['int8'] / m['paper']:>5.1f}x")
    print(json.dumps({n: m for n, m in rows}))


if __name__ == "__main__":
    main()
