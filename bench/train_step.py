"""One unlearning training step on a CPU, side by side: glibc's default heap against ``kept_heap``,
and (optionally) this checkout's loss terms against another version's.

A step of ``cmc-edge forget`` (unlearn-idk: refusal CE, avoid terms, KL and flat hold on retain
rows) on synthetic data of the recipe's shape: 16 examples of 64 tokens, the last 22 of each
scored, half forget (a third of those avoiding 40 tokens) and half retain, cached template
log-probs, the 15m delta over SmolLM2's 49,152-token vocabulary. Median seconds per step:

    python bench/train_step.py
    git show <commit>:cmc_edge/train/objectives.py > /tmp/objectives_then.py
    python bench/train_step.py --objectives /tmp/objectives_then.py     # adds that version's rows
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    import torch

    from cmc_edge.train import objectives as current
    from cmc_edge.train.loop import TrainConfig, kept_heap
    from cmc_edge.train.model import DeltaConfig, build_delta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--objectives", help="another objectives.py to time beside this checkout's")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    V, B, L, R = args.vocab, 16, 64, 22
    ids = torch.randint(V, (B, L))
    rows = torch.arange(B).repeat_interleave(R)
    cols = torch.arange(L - R - 1, L - 1).repeat(B)
    N = B * R
    forget = rows < B // 2
    avoid = torch.zeros(N, V, dtype=torch.bool)
    avoid[: N // 6, torch.randint(V, (40,))] = True
    template = torch.log_softmax(torch.randn(N, V) * 3, -1).half()
    targets = torch.randint(V, (N,))
    cfg = TrainConfig(objective="unlearn-idk", kl_weight=2.0, retain_l2=1e-4)
    delta = build_delta(DeltaConfig.preset("15m", V))
    with torch.no_grad():
        delta.model.norm.weight.fill_(1.0)
    opt = torch.optim.AdamW(delta.parameters(), lr=1e-4)

    modules = {"this checkout": current}
    if args.objectives:
        spec = importlib.util.spec_from_file_location("objectives_then", args.objectives)
        then = importlib.util.module_from_spec(spec)
        sys.modules["objectives_then"] = then            # its dataclasses look their module up
        spec.loader.exec_module(then)
        modules["--objectives"] = then

    def step(ob):
        b = ob.Batch(targets=targets, template=template.float(), roles={"forget": forget, "retain": ~forget},
                     keep=torch.zeros(N, dtype=torch.bool), avoid=avoid)
        h = delta.model(input_ids=ids).last_hidden_state[rows, cols]
        loss = sum(ob.loss_terms(b, delta.lm_head(h), cfg).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(ob):
        step(ob)                                      # warm-up
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(ob)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    res = {}
    # The default heap first: any mallopt call (kept_heap's) ends glibc's adaptive behaviour.
    for name, ob in modules.items():
        res[f"{name}, glibc default heap"] = timed(ob)
    with kept_heap() as active:
        for name, ob in modules.items():
            res[f"{name}, kept heap" + ("" if active else " (not glibc: no-op)")] = timed(ob)
    base = max(res.values())
    for name, s in res.items():
        print(f"{name:<42} {s:6.2f} s/step  ({base / s:.2f}x the slowest)")
    print(json.dumps({"vocab": V, "loss_positions": N, "s_per_step": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
