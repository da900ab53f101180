"""Cost of the drift check that ends `cmc-edge train --objective unlearn-*`, on a checkpoint.

Times :func:`cmc_edge.train.drift.check_checkpoint_drift` (delta load, prose perplexity and KL,
greedy answers by the template alone and by template + delta) at each torch thread count, CPU and
wall seconds side by side (on a shared machine the CPU seconds are the steadier number):

    python bench/drift_check.py CHECKPOINT --template smollm2 --threads 2 --threads 1
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    import torch

    from cmc_edge.train.drift import check_checkpoint_drift
    from cmc_edge.train.template import load_template

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a directory written by cmc-edge train (its drift.json is rewritten)")
    ap.add_argument("--template", default="smollm2")
    ap.add_argument("--threads", type=int, action="append", default=None, help="repeatable (default: 2)")
    args = ap.parse_args()
    tpl = load_template(args.template)
    for n in args.threads or [2]:
        torch.set_num_threads(n)
        cpu, wall = time.process_time(), time.perf_counter()
        check_checkpoint_drift(tpl, args.checkpoint)
        print(f"threads {n}: {time.process_time() - cpu:.1f} CPU-s, {time.perf_counter() - wall:.1f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
