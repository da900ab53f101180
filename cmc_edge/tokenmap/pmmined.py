"""PM-MinED token maps (CMC, Wu et al. 2024): each TARGET token gets one DELTA token, or none.

For a target token with canonical surface ``s`` (bytes, see :mod:`cmc_edge.tokenmap.vocab`):

1. **role**: a token holding a role maps to the delta's token of the same role, taking its first role
   the delta has in the order eot > eos > bos > pad (SmolLM2's <|im_end|> is eos, eot and pad). A target
   end-of-turn falls back to the delta's eos; a delta pad that is also its eos/eot/bos is an alias and
   maps nothing (target padding must not inherit an end-of-turn logit) -> SPECIAL_ROLE;
2. **exact**: a delta token with the same surface -> EXACT;
3. **prefix + minimal edit distance**: among delta tokens ``d`` where ``d`` is a prefix of ``s`` or
   ``s`` a prefix of ``d``, the one at the smallest Levenshtein distance (over bytes) -> PREFIX_EDIT.
   A delta piece made only of spaces is a candidate only for a target token made only of spaces
   (else every `` word`` would fall back to `` ``);
4. else UNMAPPED (its shift is 0 at decode time). CONTROL and UNUSED tokens without a role stay unmapped.

Only NORMAL, BYTE and USER_DEFINED tokens with non-empty surfaces take part on either side.

Tie-break, in order: smaller distance; a delta prefix of ``s`` over an extension of ``s``; a non-BYTE
delta token over a BYTE one (SentencePiece emits ``<0x41>`` only where no piece covers the byte, so
``A`` is the token the delta model actually saw); the lowest delta id.

When one string is a prefix of the other the Levenshtein distance is their length difference, so the
winner is the longest delta prefix of ``s`` or the shortest delta extension of ``s``. The builder finds
both for all target tokens at once: ``np.searchsorted`` on the sorted delta surfaces, a sparse table
for the range minimum over the extensions, and each delta surface's longest delta prefix for the
prefixes. The tests check it against a plain all-candidates rapidfuzz Levenshtein reference.

>>> from cmc_edge.tokenmap.vocab import NORMAL, Vocab
>>> def v(*ps): return Vocab(tuple(ps), np.full(len(ps), NORMAL, np.uint8), family="spm")
>>> tm = build_token_map(v(b" hello", b" hel", b"xyz", b" h"), v(b" h", b" he", b" hello!", b" hello"))
>>> tm.index.tolist(), tm.kind.tolist()     # exact, prefix " he" (1 edit), unmapped, exact
([3, 1, 0, 0], [1, 2, 0, 1])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cmc_edge.errors import InputError
from cmc_edge.tokenmap.vocab import BYTE, TEXT_KINDS, Vocab

ALGORITHM_VERSION = 1
_FAR = np.iinfo(np.int64).max
UNMAPPED, EXACT, PREFIX_EDIT, SPECIAL_ROLE, IDENTITY = 0, 1, 2, 3, 4
MATCH_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", PREFIX_EDIT: "prefix_edit", SPECIAL_ROLE: "special_role",
               IDENTITY: "identity"}
# Roles in priority order (a token can hold several: SmolLM2's <|im_end|> is eos, eot and pad), and the
# delta roles each may map to, best first.
ROLE_ORDER = ("eot", "eos", "bos", "pad")
ROLE_FALLBACK = {"eot": ("eot", "eos"), "eos": ("eos",), "bos": ("bos",), "pad": ("pad",)}


@dataclass(frozen=True, eq=False)
class TokenMap:
    """Target id -> delta id, as dense arrays plus an explicit mask (no -1 sentinels)."""

    index: np.ndarray      # (V_target,) int32: delta id; 0 where unmapped, so never read without ``mask``
    mask: np.ndarray       # (V_target,) bool
    kind: np.ndarray       # (V_target,) uint8: UNMAPPED / EXACT / PREFIX_EDIT / SPECIAL_ROLE / IDENTITY
    target_hash: str
    delta_hash: str
    algorithm_version: int = ALGORITHM_VERSION

    def __post_init__(self):
        index = np.ascontiguousarray(self.index, dtype=np.int32)
        mask = np.ascontiguousarray(self.mask, dtype=bool)
        kind = np.ascontiguousarray(self.kind, dtype=np.uint8)
        if not (index.ndim == 1 and index.shape == mask.shape == kind.shape):
            raise InputError(f"token map arrays differ in shape: index {index.shape}, mask {mask.shape}, "
                             f"kind {kind.shape}", fix="build maps with build_token_map")
        if not np.array_equal(mask, kind != UNMAPPED) or (index < 0).any() or (index[~mask] != 0).any():
            raise InputError("token map mask, kind and index disagree (mask must be kind != UNMAPPED, "
                             "index >= 0 and 0 where unmapped)", fix="build maps with build_token_map")
        for name, arr in (("index", index), ("mask", mask), ("kind", kind)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def size(self) -> int:
        return len(self.index)

    @functools.cached_property
    def is_identity(self) -> bool:
        return bool(self.size) and bool((self.kind == IDENTITY).all())

    @functools.cached_property
    def dst(self) -> np.ndarray:
        """(M,) int64: the mapped target ids, for ``logits[dst] += a * delta[src]``."""
        out = np.flatnonzero(self.mask)
        out.setflags(write=False)
        return out

    @functools.cached_property
    def src(self) -> np.ndarray:
        """(M,) int64: the delta id of each of :attr:`dst`."""
        out = self.index[self.dst].astype(np.int64)
        out.setflags(write=False)
        return out

    def counts(self) -> dict[str, int]:
        n = np.bincount(self.kind, minlength=len(MATCH_NAMES))
        return {name: int(n[k]) for k, name in MATCH_NAMES.items()}


def identity_map(vocab: Vocab) -> TokenMap:
    v = vocab.size
    return TokenMap(np.arange(v, dtype=np.int32), np.ones(v, bool), np.full(v, IDENTITY, np.uint8),
                    vocab.hash, vocab.hash)


# ----------------------------------------------------------------------------- sortable surfaces

def _sortable(pieces: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Pieces as a fixed-width numpy bytes array that sorts like the pieces, and their lengths.

    Byte b is stored as the pair (b, 1) (the little-endian uint16 b + 256, see :func:`_codes`):
    numpy's fixed-width bytes drop trailing NULs, which would make b"\\x00" equal to b"". The pairs
    compare like the bytes themselves, and prefixes still sort first.
    """
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    width = max(1, int(lens.max(initial=0)))
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype("<u2") + 256
    rows = np.repeat(np.arange(len(pieces)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    grid = np.zeros((len(pieces), width), dtype="<u2")
    grid[rows, cols] = flat
    return grid.view(f"S{2 * width}").reshape(len(pieces)), lens


def _codes(arr: np.ndarray) -> np.ndarray:
    """(N, width) uint16 view of a :func:`_sortable` array: byte + 256 per position, 0 past the end."""
    return arr.view("<u2").reshape(len(arr), arr.itemsize // 2)


def _sparse_table(keys: np.ndarray) -> list[np.ndarray]:
    """Level j holds min(keys[i : i + 2**j]) for O(1) range-minimum queries."""
    table = [keys]
    step = 1
    while 2 * step <= len(keys):
        prev = table[-1]
        table.append(np.minimum(prev[:-step], prev[step:]))
        step *= 2
    return table


def _range_min(table: list[np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(keys[lo:hi]) for each pair, all with hi > lo."""
    level = np.floor(np.log2(hi - lo)).astype(np.int64)
    out = np.empty(len(lo), dtype=table[0].dtype)
    for j in np.unique(level):
        sel = level == j
        t = table[j]
        out[sel] = np.minimum(t[lo[sel]], t[hi[sel] - (1 << int(j))])
    return out


def _prefix_parents(sorted_pieces: list[bytes]) -> np.ndarray:
    """For sorted distinct pieces: the index of each one's longest proper prefix among them, or -1."""
    parent = np.full(len(sorted_pieces), -1, dtype=np.int64)
    stack: list[int] = []                 # the chain of prefixes of the current piece
    for i, p in enumerate(sorted_pieces):
        while stack and not p.startswith(sorted_pieces[stack[-1]]):
            stack.pop()
        if stack:
            parent[i] = stack[-1]
        stack.append(i)
    return parent


def _common_prefix(a: np.ndarray, b: np.ndarray, a_lens: np.ndarray) -> np.ndarray:
    """(N,) length of the common prefix of a[i] and b[i] (arrays from :func:`_sortable`)."""
    w = min(a.itemsize, b.itemsize) // 2
    ga, gb = _codes(a)[:, :w], _codes(b)[:, :w]
    differ = np.concatenate([ga != gb, np.ones((len(a), 1), dtype=bool)], axis=1)
    return np.minimum(differ.argmax(axis=1), a_lens)


def _all_spaces(grid: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(N,) bool: the piece is non-empty and made only of b' '."""
    codes = _codes(grid)
    return (lens > 0) & ((codes == ord(" ") + 256) | (codes == 0)).all(axis=1)


# ----------------------------------------------------------------------------- the builder

def _role_pairs(target: Vocab, delta: Vocab) -> dict[int, int]:
    """target id -> delta id for tokens that map by role."""
    out: dict[int, int] = {}
    droles = dict(delta.roles)
    if "pad" in droles and droles["pad"] in {droles[r] for r in droles if r != "pad"}:
        del droles["pad"]                              # an alias (SmolLM2's pad is its eos)
    for role in reversed(ROLE_ORDER):                  # higher-priority roles overwrite lower ones
        t = target.roles.get(role)
        d = next((droles[r] for r in ROLE_FALLBACK[role] if r in droles), None)
        if t is not None and d is not None:
            out[t] = d
    return out


def build_token_map(target: Vocab, delta: Vocab) -> TokenMap:
    """The PM-MinED map from ``target`` to ``delta`` (identity if the vocabularies are the same)."""
    if target.hash == delta.hash:
        return identity_map(target)
    V = target.size
    index = np.zeros(V, dtype=np.int32)
    kind = np.zeros(V, dtype=np.uint8)

    # Delta side: one representative per distinct surface (non-BYTE first, then lowest id), sorted.
    d_lens_all = np.fromiter(map(len, delta.pieces), dtype=np.int64, count=delta.size)
    d_ids = np.flatnonzero(np.isin(delta.kinds, TEXT_KINDS) & (d_lens_all > 0))
    roles = _role_pairs(target, delta)
    t_lens_all = np.fromiter(map(len, target.pieces), dtype=np.int64, count=V)
    t_ids = np.flatnonzero(np.isin(target.kinds, TEXT_KINDS) & (t_lens_all > 0))
    if roles:
        t_ids = np.setdiff1d(t_ids, np.fromiter(roles, dtype=np.int64), assume_unique=True)
    if len(d_ids) and len(t_ids):
        d_grid, d_lens = _sortable([delta.pieces[i] for i in d_ids])
        order = np.lexsort((d_ids, delta.kinds[d_ids] == BYTE, d_grid))
        d_grid, d_lens, d_ids = d_grid[order], d_lens[order], d_ids[order]
        first = np.ones(len(d_grid), dtype=bool)
        first[1:] = d_grid[1:] != d_grid[:-1]
        D, D_lens, D_ids = d_grid[first], d_lens[first], d_ids[first]   # (N,) sorted distinct surfaces
        D_space = _all_spaces(D, D_lens)
        n = len(D)
        parent = _prefix_parents([delta.pieces[i] for i in D_ids.tolist()])

        Q, Q_lens = _sortable([target.pieces[i] for i in t_ids])      # (M,) target surfaces
        pos = np.searchsorted(D, Q, side="left")
        hit = pos < n
        hit[hit] = D[pos[hit]] == Q[hit]
        index[t_ids[hit]] = D_ids[pos[hit]]
        kind[t_ids[hit]] = EXACT

        rest = np.flatnonzero(~hit)
        Qr, Qr_lens = Q[rest], Q_lens[rest]
        lo = pos[rest]                                  # first surface > s (s itself is absent)
        # Shortest extension: the surfaces starting with s sort in [s, succ(s)), where succ(s) marks its
        # last byte's pair (b, 2) instead of (b, 1): above every extension, below anything else.
        succ = _codes(Qr).copy()
        succ[np.arange(len(Qr)), Qr_lens - 1] += 256
        hi = np.searchsorted(D, succ.view(Qr.dtype).reshape(len(Qr)), side="left")
        has_ext = hi > lo
        # key = (length, BYTE flag, id) of each surface's representative: the range minimum is the winner.
        is_byte = (delta.kinds[D_ids] == BYTE).astype(np.int64)
        keys = (D_lens << 33) | (is_byte << 32) | D_ids
        ext_id = np.zeros(len(rest), dtype=np.int64)
        ext_dist = np.full(len(rest), _FAR)
        if has_ext.any():
            best = _range_min(_sparse_table(keys), lo[has_ext], hi[has_ext])
            ext_id[has_ext] = best & 0xFFFFFFFF
            ext_dist[has_ext] = (best >> 33) - Qr_lens[has_ext]
        # Longest prefix: every delta prefix of s sorts between itself and s, so it is a prefix of the
        # predecessor D[lo - 1] no longer than their common prefix: climb the predecessor's prefix chain.
        cur = lo - 1
        lcp = _common_prefix(Qr, D[np.maximum(cur, 0)], Qr_lens)
        climb = (cur >= 0) & (D_lens[cur] > lcp)
        while climb.any():
            cur[climb] = parent[cur[climb]]
            climb = (cur >= 0) & (D_lens[cur] > lcp)
        # A spaces-only delta piece stands only for a spaces-only target token (else " word" -> " ").
        # Shorter prefixes of a spaces-only prefix are spaces-only too, so nothing else is left.
        has_pre = (cur >= 0) & (_all_spaces(Qr, Qr_lens) | ~D_space[cur])
        pre_dist = np.where(has_pre, Qr_lens - D_lens[cur], _FAR)
        use_pre = pre_dist <= ext_dist                      # equal distance: the prefix wins
        mapped = np.minimum(pre_dist, ext_dist) < _FAR
        t_rest = t_ids[rest[mapped]]
        index[t_rest] = np.where(use_pre, D_ids[cur], ext_id)[mapped]
        kind[t_rest] = PREFIX_EDIT

    for t, d in roles.items():
        index[t], kind[t] = d, SPECIAL_ROLE
    return TokenMap(index, kind != UNMAPPED, kind, target.hash, delta.hash)
