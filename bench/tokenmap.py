"""Token-map speed: vocabulary reading, the fast PM-MinED builder vs the plain reference, map loading.

The reference is the literal definition (every delta token checked for a prefix relation, rapidfuzz
Levenshtein over the candidates), timed on a random sample of target tokens and extrapolated to the
whole target vocabulary; its answers on the sample are checked against the fast map.

    python bench/tokenmap.py [--sample 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeat: int):
    """(median seconds, last result)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def plain_pm_mined(s: bytes, candidates: list[tuple[int, bytes, int]]) -> int | None:
    """The delta id for target surface ``s`` by the definition, or None. ``candidates``: (id, piece, is_byte)."""
    from rapidfuzz.distance import Levenshtein

    spaces = s.strip(b" ") == b""
    best = None
    for d, p, is_byte in candidates:
        if not (p.startswith(s) or s.startswith(p)):
            continue
        if p.strip(b" ") == b"" and not spaces:
            continue
        key = (Levenshtein.distance(s, p), 0 if s.startswith(p) else 1, is_byte, d)
        if best is None or key < best:
            best = key
    return None if best is None else best[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=300, help="target tokens for the reference (default 300)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from cmc_edge.models import gemma3_path, smollm2_path
    from cmc_edge.tokenmap import (BYTE, PREFIX_EDIT, SPECIAL_ROLE, build_token_map, cached_token_map,
                                   load_token_map, read_gguf_vocab, save_token_map)
    from cmc_edge.tokenmap.vocab import TEXT_KINDS

    smol_path, gemma_path = smollm2_path(), gemma3_path()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}; "
          f"python {platform.python_version()}, numpy {np.__version__}")

    t_smol, smol = timed(lambda: read_gguf_vocab(smol_path), args.repeat)
    t_gemma, gemma = timed(lambda: read_gguf_vocab(gemma_path), args.repeat)
    print(f"vocab read  SmolLM2 ({smol.size:,}): {t_smol:.3f} s")
    print(f"vocab read  Gemma 3 ({gemma.size:,}): {t_gemma:.3f} s")

    def fast():
        return build_token_map(read_gguf_vocab(gemma_path), read_gguf_vocab(smol_path))

    t_build_only, _ = timed(lambda: build_token_map(gemma, smol), args.repeat)
    t_fast, tm = timed(fast, args.repeat)
    print(f"fast build  Gemma 3 -> SmolLM2, both vocab reads included: {t_fast:.3f} s "
          f"(build alone {t_build_only:.3f} s); {tm.counts()}")

    rng = np.random.default_rng(args.seed)
    text_ids = np.flatnonzero(np.isin(gemma.kinds, TEXT_KINDS))
    sample = rng.choice(text_ids, min(args.sample, len(text_ids)), replace=False)
    candidates = [(d, p, int(k == BYTE)) for d, (p, k) in enumerate(zip(smol.pieces, smol.kinds))
                  if p and k in TEXT_KINDS]
    t0 = time.perf_counter()
    ref = [plain_pm_mined(gemma.pieces[t], candidates) for t in sample.tolist()]
    t_ref = time.perf_counter() - t0
    agree = sum((r is None and not tm.mask[t]) or (r is not None and tm.mask[t] and tm.index[t] == r
                                                   and tm.kind[t] != SPECIAL_ROLE)
                for t, r in zip(sample.tolist(), ref))
    per_token = t_ref / len(sample)
    t_ref_full = per_token * gemma.size
    print(f"reference   {len(sample)} sampled target tokens: {t_ref:.2f} s = {per_token * 1e3:.1f} ms/token "
          f"-> {t_ref_full:,.0f} s extrapolated to {gemma.size:,} tokens; agrees with the fast map on "
          f"{agree}/{len(sample)} ({int((tm.kind[sample] == PREFIX_EDIT).sum())} of them prefix-edit)")
    print(f"ratio       reference / fast build (vocab reads included): {t_ref_full / t_fast:,.0f}x; "
          f"/ build alone: {t_ref_full / t_build_only:,.0f}x")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_token_map(tm, Path(tmp) / "gemma3-smollm2.npz")
        t_load, _ = timed(lambda: load_token_map(path, target_hash=tm.target_hash, delta_hash=tm.delta_hash),
                          max(20, args.repeat))
        cached_token_map(gemma_path, smol, Path(tmp) / "cache")
        t_hit, _ = timed(lambda: cached_token_map(gemma_path, smol, Path(tmp) / "cache"), max(20, args.repeat))
        size = path.stat().st_size
    print(f"map load    {t_load * 1e3:.1f} ms ({size / 1e6:.1f} MB .npz, hashes checked); "
          f"cache hit via cached_token_map {t_hit * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
