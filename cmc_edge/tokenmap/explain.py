"""Coverage statistics and per-token explanations, for `cmc-edge map --stats --lookup`."""

from __future__ import annotations

import numpy as np

from cmc_edge.errors import InputError
from cmc_edge.tokenmap.pmmined import MATCH_NAMES, PREFIX_EDIT, SPECIAL_ROLE, TokenMap
from cmc_edge.tokenmap.vocab import KIND_NAMES, NORMAL, TEXT_KINDS, Vocab, canonical_piece


def _check(tm: TokenMap, target: Vocab, delta: Vocab) -> None:
    if tm.target_hash != target.hash or tm.delta_hash != delta.hash:
        raise InputError("this token map was built for other vocabularies",
                         fix="pass the target and delta vocabularies the map was built from")


def map_stats(tm: TokenMap, target: Vocab, delta: Vocab, sample_token_ids=None) -> dict:
    """Coverage by match kind: over the target vocabulary, over its text tokens, and (with
    ``sample_token_ids``, target ids of some real text) weighted by how often each token occurs."""
    _check(tm, target, delta)
    counts = tm.counts()
    text = np.isin(target.kinds, TEXT_KINDS)
    out = {
        "target_vocab": target.size, "delta_vocab": delta.size, "identity": tm.is_identity,
        "algorithm_version": tm.algorithm_version,
        "by_kind": counts,
        "coverage": float(tm.mask.mean()) if tm.size else 0.0,
        "text_tokens": int(text.sum()),
        "text_coverage": float(tm.mask[text].mean()) if text.any() else 0.0,
        "target_kinds": {KIND_NAMES[k]: int((target.kinds == k).sum()) for k in KIND_NAMES},
    }
    if sample_token_ids is not None:
        ids = np.asarray(sample_token_ids, dtype=np.int64).ravel()
        if len(ids) and (ids.min() < 0 or ids.max() >= tm.size):
            raise InputError(f"sample token ids must lie in [0, {tm.size})", fix="tokenize the sample with the target model")
        n = np.bincount(tm.kind[ids], minlength=len(MATCH_NAMES))
        out["sample_tokens"] = int(len(ids))
        out["by_frequency"] = {name: float(n[k] / max(1, len(ids))) for k, name in MATCH_NAMES.items()}
        out["sample_coverage"] = float(tm.mask[ids].mean()) if len(ids) else 0.0
    return out


def _lookup(target: Vocab, key: int | str) -> list[int]:
    if isinstance(key, (int, np.integer)):
        if not 0 <= int(key) < target.size:
            raise InputError(f"token id {key} is out of range", fix=f"the target vocabulary has ids 0..{target.size - 1}")
        return [int(key)]
    wanted = {key.encode("utf-8"), canonical_piece(key, NORMAL, target.family)}   # "hello", "▁hello", "Ġhello"
    return [i for i, p in enumerate(target.pieces) if p and p in wanted]


def explain(tm: TokenMap, target: Vocab, delta: Vocab, token_id_or_text: int | str) -> str:
    """How a target token maps, one line per matching target token:

    ``target 1234 b' hello' (normal) -> delta 22 b' hello' [exact]``
    """
    _check(tm, target, delta)
    ids = _lookup(target, token_id_or_text)
    if not ids:
        return f"{token_id_or_text!r}: no target token has this surface"
    lines = []
    for t in ids:
        head = f"target {t} {target.pieces[t]!r} ({KIND_NAMES[int(target.kinds[t])]})"
        k = int(tm.kind[t])
        if not tm.mask[t]:
            why = ("a control/unused token with no role the delta shares" if target.kinds[t] not in TEXT_KINDS
                   else "no delta token is a prefix or an extension of it")
            lines.append(f"{head} -> unmapped: {why}")
            continue
        d = int(tm.index[t])
        s, p = target.pieces[t], delta.pieces[d]
        note = ""
        if k == PREFIX_EDIT:
            rel = "a prefix of" if s.startswith(p) else "an extension of"
            note = f", delta piece is {rel} the target's, edit distance {abs(len(s) - len(p))}"
        elif k == SPECIAL_ROLE:
            roles = [r for r, i in target.roles.items() if i == t]
            note = f", role {'/'.join(sorted(roles))}"
        lines.append(f"{head} -> delta {d} {p!r} ({KIND_NAMES[int(delta.kinds[d])]}) [{MATCH_NAMES[k]}{note}]")
    return "\n".join(lines)
