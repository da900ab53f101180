"""PM-MinED token maps (CMC, Wu et al. 2024): target vocabulary -> delta vocabulary.

For each target token with canonical surface ``s``:

1. **exact**: the delta token whose canonical surface equals ``s`` (lowest id if several);
2. else **prefix + minimal edit distance**: among delta tokens ``d`` where ``d`` is a prefix of
   ``s`` or ``s`` is a prefix of ``d`` (a delta piece made only of spaces is a candidate only
   for all-space target tokens), the one with the smallest Levenshtein distance. When one string
   is a prefix of the other, their Levenshtein distance is exactly the length difference, so the
   winner is the longest delta prefix of ``s`` or the shortest delta extension of ``s``;
3. else **unmapped** (shift 0 at decode time).

Tie-break (deterministic, tested): smaller distance; then a delta prefix of ``s`` over an
extension of ``s``; then the lowest delta id. Control tokens map by role (bos->bos, eos->eos,
end-of-turn->eos, pad->pad) or stay unmapped. Identical vocabularies give the identity map.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from cmc_edge.tokenmap.vocab import BYTE, NORMAL, USER_DEFINED, Vocab

ALGORITHM_VERSION = 1
UNMAPPED, EXACT, PREFIX_EDIT, SPECIAL_ROLE, IDENTITY = 0, 1, 2, 3, 4
MATCH_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", PREFIX_EDIT: "prefix-edit", SPECIAL_ROLE: "special-role",
               IDENTITY: "identity"}
_SURFACE = (NORMAL, BYTE, USER_DEFINED)
# Target roles and the delta role each maps to: a target's end-of-turn is the delta's end token.
ROLE_MAP = {"bos": "bos", "eos": "eos", "eot": "eos", "pad": "pad"}


@dataclass(frozen=True)
class TokenMap:
    index: np.ndarray          # int32 (V_target,): delta id (0 where unmapped; read only with mask)
    mask: np.ndarray           # bool (V_target,)
    kind: np.ndarray           # uint8 (V_target,): UNMAPPED / EXACT / PREFIX_EDIT / SPECIAL_ROLE / IDENTITY
    target_hash: str
    delta_hash: str
    algorithm_version: int = ALGORITHM_VERSION

    @property
    def is_identity(self) -> bool:
        return self.target_hash == self.delta_hash and bool(np.all(self.kind == IDENTITY))

    @property
    def dst(self) -> np.ndarray:
        """Mapped target ids (for a vectorised gather)."""
        return np.flatnonzero(self.mask).astype(np.int64)

    @property
    def src(self) -> np.ndarray:
        """The delta id of each mapped target id, aligned with :attr:`dst`."""
        return self.index[self.mask].astype(np.int64)


def _sparse_min(keys: np.ndarray) -> list[np.ndarray]:
    """Sparse table for O(1) range-minimum queries over ``keys``."""
    table = [keys]
    k = 1
    while 2 * k <= len(keys):
        prev = table[-1]
        table.append(np.minimum(prev[:-k], prev[k:]))
        k *= 2
    return table


def _range_min(table, lo: int, hi: int) -> int:
    """min(keys[lo:hi]) for hi > lo."""
    j = (hi - lo).bit_length() - 1
    return int(min(table[j][lo], table[j][hi - (1 << j)]))


def _prefix_end(s: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``s`` (None: no bound)."""
    b = bytearray(s)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return None
    b[-1] += 1
    return bytes(b)


def build_token_map(target: Vocab, delta: Vocab) -> TokenMap:
    V = target.size
    if target.hash == delta.hash:
        return TokenMap(np.arange(V, dtype=np.int32), np.ones(V, bool), np.full(V, IDENTITY, np.uint8),
                        target.hash, delta.hash)
    exact: dict[bytes, int] = {}
    for i, (p, k) in enumerate(zip(delta.pieces, delta.kinds)):
        if p and k in _SURFACE and p not in exact:
            exact[p] = i
    sorted_pieces = sorted(exact)
    ids = np.array([exact[p] for p in sorted_pieces], np.int64)
    lens = np.array([len(p) for p in sorted_pieces], np.int64)
    table = _sparse_min(lens * (1 << 32) + ids) if len(ids) else None

    index = np.zeros(V, np.int32)
    kind = np.zeros(V, np.uint8)
    for t, (s, k) in enumerate(zip(target.pieces, target.kinds)):
        if not s or k not in _SURFACE:
            continue
        hit = exact.get(s)
        if hit is not None:
            index[t], kind[t] = hit, EXACT
            continue
        all_space = s.strip(b" ") == b""
        best = None  # (distance, 0 = prefix / 1 = extension, delta id)
        for n in range(len(s) - 1, 0, -1):
            d = exact.get(s[:n])
            if d is not None and (all_space or s[:n].strip(b" ") != b""):
                best = (len(s) - n, 0, d)
                break
        if table is not None:
            lo = bisect.bisect_right(sorted_pieces, s)       # extensions are strictly longer than s
            end = _prefix_end(s)
            hi = len(sorted_pieces) if end is None else bisect.bisect_left(sorted_pieces, end)
            if hi > lo:
                key = _range_min(table, lo, hi)
                cand = (int(key >> 32) - len(s), 1, int(key & 0xFFFFFFFF))
                if best is None or cand < best:
                    best = cand
        if best is not None:
            index[t], kind[t] = best[2], PREFIX_EDIT
    for role, drole in ROLE_MAP.items():
        t, d = target.roles.get(role), delta.roles.get(drole)
        if t is not None and d is not None and kind[t] == 0:
            index[t], kind[t] = d, SPECIAL_ROLE
    return TokenMap(index, kind != UNMAPPED, kind, target.hash, delta.hash)
