"""Training throughput: template forward in fp32 vs bf16 weights vs cached template log-probs.

Measures seconds per optimizer step for a batch of ``--batch`` x ``--seq`` tokens (the issue's
anchor is 4 x 256) with the 15m delta beside the template, all in one run:

    python bench/train.py --template smollm2 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    import torch

    from cmc_edge.train.data import Example
    from cmc_edge.train.loop import combined_losses, template_logprobs
    from cmc_edge.train.model import DeltaConfig, build_delta
    from cmc_edge.train.template import load_template

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="15m")
    args = ap.parse_args()

    tpl = load_template(args.template, device=args.device)
    V = tpl.vocab_size
    g = torch.Generator().manual_seed(0)
    # Half prompt, half response: loss on the response half, as in training.
    exs = [Example(tuple(torch.randint(V, (args.seq // 2,), generator=g).tolist()),
                   tuple(torch.randint(V, (args.seq // 2,), generator=g).tolist()), "sft") for _ in range(args.batch)]
    delta = build_delta(DeltaConfig.preset(args.size, V)).to(args.device)
    with torch.no_grad():
        delta.model.norm.weight.fill_(1.0)
    opt = torch.optim.AdamW(delta.parameters(), lr=1e-4)
    ids = torch.tensor([e.ids for e in exs], device=args.device)
    P = args.seq // 2
    targets = torch.tensor([e.response_ids for e in exs], device=args.device).reshape(-1)

    def step(tlp):
        h = delta.model(input_ids=ids).last_hidden_state[:, P - 1:-1].reshape(-1, delta.config.hidden_size)
        ce, _ = combined_losses(tlp, delta.lm_head(h), targets, 1.0)
        loss = ce.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(fn):
        fn()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def fp32():
        step(torch.cat(template_logprobs(tpl.model, exs, 0, chunk=args.batch)).to(args.device).float())

    # bf16: the template's weights in bfloat16 (CPU autocast over the GGUF-loaded model fails in
    # torch 2.13 with "Unexpected floating ScalarType in at::autocast::prioritize").
    import copy

    tpl_bf16 = copy.deepcopy(tpl.model).to(torch.bfloat16)

    def bf16():
        step(torch.cat(template_logprobs(tpl_bf16, exs, 0, chunk=args.batch)).to(args.device).float())

    cache = torch.cat(template_logprobs(tpl.model, exs, 0, chunk=args.batch))

    def cached():
        step(cache.to(args.device).float())

    res = {name: timed(fn) for name, fn in (("fp32", fp32), ("bf16", bf16), ("cached", cached))}
    tokens = args.batch * args.seq
    for name, s in res.items():
        print(f"{name:<7} {s:6.2f} s/step  {tokens / s:8.0f} tok/s  ({res['fp32'] / s:.2f}x fp32)")
    print(json.dumps({"device": args.device, "batch": args.batch, "seq": args.seq, "s_per_step": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
