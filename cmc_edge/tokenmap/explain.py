"""Coverage statistics and per-token explanations for `cmc-edge map --stats --lookup`."""

from __future__ import annotations

import numpy as np

from cmc_edge.tokenmap.pmmined import MATCH_NAMES, TokenMap
from cmc_edge.tokenmap.vocab import KIND_NAMES, Vocab


def map_stats(tm: TokenMap, target: Vocab, delta: Vocab, sample_token_ids=None) -> dict:
    counts = {MATCH_NAMES[k]: int((tm.kind == k).sum()) for k in MATCH_NAMES}
    out = {"target_vocab": target.size, "delta_vocab": delta.size, "by_count": counts,
           "by_count_fraction": {k: v / max(1, target.size) for k, v in counts.items()}}
    if sample_token_ids is not None and len(sample_token_ids):
        ids = np.asarray(sample_token_ids, np.int64)
        kinds = tm.kind[ids]
        out["by_frequency"] = {MATCH_NAMES[k]: float((kinds == k).mean()) for k in MATCH_NAMES}
        out["sample_tokens"] = int(len(ids))
    return out


def explain(tm: TokenMap, target: Vocab, delta: Vocab, token) -> str:
    """How a target token (id, or surface text) maps."""
    if isinstance(token, str):
        want = token.encode("utf-8")
        ids = [i for i, p in enumerate(target.pieces) if p == want]
        if not ids:
            return f"{token!r}: no target token has this surface"
        token = ids[0]
    t = int(token)
    if not 0 <= t < target.size:
        return f"{t}: out of range (target vocabulary has {target.size} tokens)"
    src = f"target {t} {target.pieces[t]!r} ({KIND_NAMES[int(target.kinds[t])]})"
    if not tm.mask[t]:
        return f"{src} -> unmapped (shift 0)"
    d = int(tm.index[t])
    return f"{src} -> delta {d} {delta.pieces[d]!r} [{MATCH_NAMES[int(tm.kind[t])]}]"
