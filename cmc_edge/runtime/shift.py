"""The delta's output layer, applied outside the ONNX graph, and the mapped shift at decode time.

The delta graph ends at its final hidden state ``h`` (d,). Its logits are ``z = E @ h`` with the
tied embedding ``E`` (V_d, d), and the shift CMC adds to target token ``t`` is::

    s_t = alpha * (z[src_t] - mean(z))        mapped t       (mean(z) = mean_row(E) . h)
    s_t = 0                                   unmapped t

Computing all of ``z`` reads the whole of ``E`` every step (12.6M floats for a 49k vocabulary):
more memory traffic than the delta's transformer layers, and on a CPU that traffic competes with
llama.cpp's own. A sampler that only looks at the top ``k`` scores (greedy: k = 1; top-k) does not
need it. The export groups the centred rows ``E_j - mean_row(E)`` (k-means, centroid ``c_b``,
radius ``rho_b``), so every shift of a row in group ``b`` lies in
``alpha * (c_b.h -+ rho_b |h|)`` (Cauchy-Schwarz on the row's offset from its centroid; without
groups each row is its own group with centroid 0). So, with ``lo``/``hi`` the group's range,

    lb_t = T_t + lo_t  <=  T_t + s_t  <=  T_t + hi_t = ub_t

and with ``theta`` at most the k-th largest combined score, every token with ``ub_t < theta`` is
provably outside the top k. :func:`add_shift_` computes the exact shift only for the candidates
(``ub_t >= theta``), writes their exact combined scores and ``-inf`` elsewhere: the sampler's top k
(and everything it samples from) is exactly what the full computation gives. When the candidate
set would be large, or the sampler needs the whole distribution, it computes everything. Greedy
decoding needs no sampler at all: :func:`shifted_argmax` returns the best candidate.

>>> E = np.array([[1., 0.], [0., 1.], [-1., 0.], [0., -1.]], np.float32)
>>> head = DeltaHead(E)
>>> m = MappedHead(head, index=np.arange(4), mask=np.ones(4, bool))
>>> T = np.array([0., 0.5, 3., 1.], np.float32)
>>> h = np.array([2., 0.], np.float32)        # z = [2, 0, -2, 0]
>>> full = T.copy(); _ = add_shift_(full, [(m, h, 1.0)], k=None); full.tolist()
[2.0, 0.5, 1.0, 1.0]
>>> fast = T.copy(); _ = add_shift_(fast, [(m, h, 1.0)], k=1); int(fast.argmax()), float(fast[0])
(0, 2.0)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cmc_edge.combine import centred_np, floored_np
from cmc_edge.errors import DeltaFault

# Past this many candidates (rows of E gathered) the full computation is about as cheap; use it.
MAX_CANDIDATES = 16384
# Tokens within reach of the top by the coarse (widest-group) bound, past which the pool test is
# skipped and every token gets its group's bound directly.
MAX_POOL = 65536
# Up to this many pool tokens, their groups' centroids are gathered; past it every centroid is read once.
GATHER_POOL = 2048
# Slack for float32 rounding in the bound (relative, absolute).
_REL, _ABS = 1e-5, 1e-4


class DeltaHead:
    """The tied output layer ``z = E @ h`` of one delta, with what the bounds need. E: (V_d, d).

    ``groups`` (optional, from the bundle): a clustering of the centred rows ``E_j - mean(E)``,
    ``labels`` (V_d,) and ``centroids`` (B, d). Then ``E_j.h - mean.h`` lies within
    ``c_b.h +- rho_b |h|`` (``rho_b``: the group's radius), far tighter than Cauchy-Schwarz alone.
    Without groups every row is its own group with centroid 0.
    """

    def __init__(self, embedding: np.ndarray, groups: tuple[np.ndarray, np.ndarray] | None = None):
        E = np.ascontiguousarray(embedding, dtype=np.float32)
        if E.ndim != 2 or not np.isfinite(E).all():
            raise DeltaFault(f"the delta's embedding must be a finite 2-D array, got shape {E.shape}",
                             fix="re-export the bundle with `cmc-edge export`")
        self.E = E
        self.mean_row = E.mean(axis=0, dtype=np.float64).astype(np.float32)             # (d,)
        if groups is None:
            self.labels = np.arange(len(E), dtype=np.int64)                             # (V_d,)
            self.centroids = None
            centre = lambda i, j: 0.0                                                   # noqa: E731
        else:
            labels, centroids = groups
            self.labels = np.asarray(labels, dtype=np.int64)
            self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)          # (B, d)
            if self.labels.shape != (len(E),) or self.centroids.shape[1:] != (E.shape[1],) or (
                    len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.centroids))):
                raise DeltaFault("the delta's head groups do not fit its embedding",
                                 fix="re-export the bundle with `cmc-edge export`")
            centre = lambda i, j: self.centroids[self.labels[i:j]]                      # noqa: E731
        n_groups = len(E) if groups is None else len(self.centroids)
        dist = np.empty(len(E), np.float32)                                             # |E_j - mean - c_b|
        for i in range(0, len(E), 8192):                                                # no (V_d, d) temporary
            dist[i:i + 8192] = np.linalg.norm(E[i:i + 8192] - self.mean_row - centre(i, i + 8192), axis=1)
        self.group_radius = np.zeros(n_groups, np.float32)                              # (B,)
        np.maximum.at(self.group_radius, self.labels, dist)
        # |E_j - mean| <= |c_b| + rho_b for every row: one number bounds every centred logit by |h| times it
        c_norm = np.zeros(n_groups, np.float32) if groups is None else np.linalg.norm(self.centroids, axis=1)
        self.max_offset = float((c_norm + self.group_radius).max()) if n_groups else 0.0

    @property
    def n_groups(self) -> int:
        return len(self.group_radius)

    def centred_range(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per group, bounds on ``E_j.h - mean.h`` for its rows. (d,) -> (B,), (B,)"""
        hn = float(np.linalg.norm(h))
        r = self.group_radius * np.float32(hn * (1 + _REL))
        if self.centroids is None:
            return -r, r
        c = np.einsum("bd,d->b", self.centroids, h)
        return c - r, c + r

    def centred_range_of(self, h: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`centred_range` for the given groups only (one entry per id, repeats allowed):
        reads their centroids, not all of them. (d,), (n,) -> (n,), (n,)"""
        r = self.group_radius[groups] * np.float32(float(np.linalg.norm(h)) * (1 + _REL))
        if self.centroids is None:
            return -r, r
        c = np.einsum("nd,d->n", self.centroids[groups], h)
        return c - r, c + r

    @property
    def vocab_size(self) -> int:
        return self.E.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.E.shape[1]

    def logits(self, h: np.ndarray) -> np.ndarray:
        """All delta logits. (..., d) -> (..., V_d)

        One position (the decode loop) goes through einsum, not BLAS: OpenBLAS's worker threads
        spin after a call and take the cores llama.cpp's threads are about to need (measured: the
        full path under BLAS cost ~20 ms per token beside llama.cpp, against ~2.2 ms standalone).
        """
        h = np.asarray(h, np.float32)
        if h.ndim == 1:
            return np.einsum("vd,d->v", self.E, h)
        return h @ self.E.T

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Input embeddings (the same tied table). (S,) -> (S, d)"""
        return self.E[ids]


class MappedHead:
    """One delta head seen from one target vocabulary: target id -> delta id (``index``, ``mask``).
    ``floor``: shifts smaller than this in magnitude are dropped (:func:`cmc_edge.combine.floored_np`;
    the bundle's ``shift_floor``, 0 for none)."""

    def __init__(self, head: DeltaHead, index: np.ndarray, mask: np.ndarray, floor: float = 0.0):
        self.head = head
        self.floor = float(floor)
        if not (math.isfinite(self.floor) and self.floor >= 0):
            raise DeltaFault(f"the shift floor must be a finite number >= 0, got {floor!r}",
                             fix="set shift_floor in the bundle's manifest to 0 or more (0: no floor)")
        self.index = np.ascontiguousarray(index, dtype=np.int64)                         # (V_t,)
        self.mask = np.ascontiguousarray(mask, dtype=bool)                              # (V_t,)
        if self.index.shape != self.mask.shape or (self.mask & (self.index >= head.vocab_size)).any():
            raise DeltaFault("the token map points outside the delta's vocabulary",
                             fix="rebuild the map (`cmc-edge map`) for this bundle")
        self.dst = np.flatnonzero(self.mask)                                            # (M,)
        self.src = self.index[self.dst]                                                 # (M,)
        # each target token's group; unmapped tokens point at an extra group whose shift is exactly 0
        self.tlabel = np.where(self.mask, head.labels[np.where(self.mask, self.index, 0)],
                               head.n_groups).astype(np.int32)                          # (V_t,)

    def shift_full(self, h: np.ndarray, alpha: float, out: np.ndarray) -> None:
        """``out += shift`` over the whole target vocabulary. (V_t,)"""
        z = centred_np(self.head.logits(h))                                             # (V_d,)
        out[self.dst] += floored_np(np.float32(alpha) * z[self.src], self.floor)

    def shift_at(self, h: np.ndarray, alpha: float, ids: np.ndarray) -> np.ndarray:
        """The exact shift of target tokens ``ids`` only. (n,)

        The centring of :func:`cmc_edge.combine.centred_np` by linearity, without the full logits:
        ``E_i . h - mean_row(E) . h == z_i - mean(z)`` (tested against :meth:`shift_full`)."""
        rows = self.head.E[self.index[ids]]                                             # (n, d)
        # einsum, not BLAS: no worker threads waking up beside llama.cpp's for a small product
        z = np.einsum("ij,j->i", rows, h) - np.float32(self.mean_row_dot(h))
        return floored_np(np.where(self.mask[ids], np.float32(alpha) * z, np.float32(0.0)), self.floor)

    def mean_row_dot(self, h: np.ndarray) -> float:
        return float(self.head.mean_row @ h)

    def shift_bound(self, h: np.ndarray, alpha: float) -> float:
        """A bound on every token's |shift| (the unmapped ones' is 0): |alpha| |h| max_j |E_j - mean|.
        Looser than :meth:`shift_range` but free: no centroid is read."""
        return abs(float(alpha)) * float(np.linalg.norm(h)) * self.head.max_offset * (1 + _REL) + _ABS

    def shift_range_at(self, h: np.ndarray, alpha: float, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest shift of target tokens ``ids`` by their groups (0 for unmapped). (n,) x 2"""
        g = self.tlabel[ids]
        mapped = g < self.head.n_groups
        lo, hi = self.head.centred_range_of(h, np.where(mapped, g, 0))
        a = np.float32(alpha)
        s_lo, s_hi = self._with_floor(np.minimum(a * lo, a * hi), np.maximum(a * lo, a * hi))
        zero = np.float32(0.0)
        return (np.where(mapped, s_lo, zero) - np.float32(_ABS), np.where(mapped, s_hi, zero) + np.float32(_ABS))

    def _with_floor(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A range of shifts once the floor may drop any of them to 0: widened to hold 0."""
        if not self.floor:
            return lo, hi
        return np.minimum(lo, np.float32(0.0)), np.maximum(hi, np.float32(0.0))

    def shift_range(self, h: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Per group (plus the unmapped group, last), the lowest and highest shift. (B + 1,) x 2"""
        lo, hi = self.head.centred_range(h)
        a = np.float32(alpha)
        s_lo, s_hi = self._with_floor(np.minimum(a * lo, a * hi), np.maximum(a * lo, a * hi))
        zero = np.zeros(1, np.float32)
        return np.concatenate([s_lo, zero]) - np.float32(_ABS), np.concatenate([s_hi, zero]) + np.float32(_ABS)


def group_rows(E: np.ndarray, n_groups: int = 2048, iters: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means over the centred rows of ``E`` (done once, at export): (labels (V,), centroids (B, d)).

    Measured on the demo filter: the per-group bound keeps 3-4 candidates (median) where
    Cauchy-Schwarz keeps 7-24 for greedy decoding, and a fifth to a half of them at top-40.
    """
    E = np.asarray(E, np.float32)
    X = E - E.mean(axis=0, dtype=np.float64).astype(np.float32)
    n_groups = max(1, min(n_groups, len(X) // 8 or 1))
    C = X[np.random.default_rng(seed).choice(len(X), n_groups, replace=False)].copy()
    labels = np.zeros(len(X), np.int64)
    for _ in range(iters):
        cc = (C * C).sum(1)
        for i in range(0, len(X), 8192):                    # argmin |x - c|^2 = argmin |c|^2 - 2 x.c
            labels[i:i + 8192] = (cc[None] - 2 * X[i:i + 8192] @ C.T).argmin(1)
        sums = np.zeros_like(C, dtype=np.float64)
        np.add.at(sums, labels, X)
        counts = np.bincount(labels, minlength=n_groups)
        filled = counts > 0                                  # an empty group keeps its centroid
        C[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return labels.astype(np.int32), C


def sampler_top_k(temperature: float, top_k: int, repeat_penalty: float = 1.0) -> int | None:
    """How many top scores llama-cpp-python's sampler chain can ever pick from (None: all of them).

    Greedy reads only the maximum; top-k with k > 0 cuts to k before top-p, min-p, temperature and
    the draw, so scores outside the top k never matter. A repeat penalty runs before the cut and
    can reorder, so it needs everything.
    """
    if repeat_penalty != 1.0:
        return None
    if temperature == 0.0:
        return 1
    return top_k if top_k > 0 else None


def add_shift_(logits: np.ndarray, parts: Sequence[tuple[MappedHead, np.ndarray, float]], *,
               k: int | None, max_candidates: int = MAX_CANDIDATES) -> bool:
    """Add every delta's shift to the target ``logits`` (V_t,) in place. Returns True when it took
    the exact top-``k`` path (candidates exact, ``-inf`` elsewhere), False for the full path."""
    V = logits.shape[0]
    if k is not None and 0 < k < V:
        got = _top_k_candidates(logits, parts, k, max_candidates)
        if got is not None:
            ids, scores = got
            logits.fill(-np.inf)
            logits[ids] = scores
            return True
    for m, h, a in parts:
        m.shift_full(h, a, logits)
    return False


def shifted_argmax(logits: np.ndarray, parts: Sequence[tuple[MappedHead, np.ndarray, float]], *,
                   max_candidates: int = MAX_CANDIDATES) -> int | None:
    """The greedy token of the combined scores, from the candidates alone; ``logits`` is not written.

    Among exactly tied best scores it returns the lowest id, as llama.cpp's greedy sampler does
    (it keeps the first maximum in id order). None where the candidate set is too large: then add
    the full shift and sample. A greedy loop that takes this token skips llama.cpp's sampler, which
    copies every score into a candidate array (0.45 ms a token for Gemma 3's 262k vocabulary,
    measured here), and skips writing ``-inf`` over the vocabulary.
    """
    got = _top_k_candidates(logits, parts, 1, max_candidates)
    if got is None:
        return None
    ids, scores = got           # every token tied with the best is among them (it bounds >= theta)
    return int(ids[scores == scores.max()].min())


def _top_k_candidates(T: np.ndarray, parts, k: int, max_candidates: int):
    """(ids, exact combined scores) of a set that provably holds the top k, or None if too large.

    Two levels, so that only two passes touch the whole vocabulary: every shift sum lies in
    ``[-s, s]`` (``s`` from each head's largest row offset, :meth:`MappedHead.shift_bound`, no
    centroid read), so tokens with ``T < theta - s`` cannot reach ``theta`` (the *pool* test,
    one comparison over V); the per-group bounds run on the pool only, reading only its tokens'
    centroids (all of them were 0.2 ms a step, cold, for a pool of one or two tokens). The exact
    shifts then run on the candidates best upper bound first, in growing chunks, and stop once k
    exact scores beat every bound still unread (a strong shift can leave thousands of candidates
    of which a few dozen decide).
    """
    s_hi = sum(m.shift_bound(h, a) for m, h, a in parts)    # every token's shift sum lies in [-s_hi, s_hi]
    s_lo = -s_hi
    top = int(T.argmax())
    if k == 1:                              # the raw best token's exact score: one token reaches it
        theta = float(_exact(T, parts, np.array([top]))[0])
    else:                                   # its lower bound is <= the top combined score
        theta = float(T[top]) + sum(float(m.shift_range_at(h, a, np.array([top]))[0][0]) for m, h, a in parts)
    for _ in range(2):                      # a second pool only when theta had to come down
        pool = np.flatnonzero(T >= theta - s_hi)                   # holds every token with ub >= theta
        if len(pool) > MAX_POOL:            # a far-reaching shift somewhere: bound every token instead
            pool = np.arange(len(T))
        if len(pool) < k:                   # peaked: start from the k-th best raw score (rare, O(V))
            theta = float(np.partition(T, -k)[-k]) + s_lo
            continue
        Tp = T[pool]
        lower, upper = Tp.copy(), Tp.copy()
        for m, h, a in parts:
            if len(pool) <= GATHER_POOL:    # the pool's own groups
                lo, hi = m.shift_range_at(h, a, pool)
            else:                           # every group once, then per token
                lo, hi = (r[m.tlabel[pool]] for r in m.shift_range(h, a))
            lower += lo
            upper += hi
        # The k-th best lower bound: k tokens score at least that, so it is <= the k-th best score.
        kth = float(lower.max()) if k == 1 else float(np.partition(lower, -k)[-k])
        if k == 1 or kth >= theta:          # (for k = 1 theta is already a score some token reaches)
            theta = max(theta, kth)
            break
        theta = kth                         # lower than the pool was cut for: cut a wider pool
    else:
        return None
    keep = upper >= theta
    ids, bound = pool[keep], upper[keep]
    if len(ids) > max_candidates:
        return None
    order = np.argsort(-bound, kind="stable")
    done, chunk = 0, max(4 * k, 32)
    read, scores = ids[:0], np.empty(0, np.float32)
    while done < len(ids):                  # exact scores, best bounds first
        take = ids[order[done:done + chunk]]
        read, scores = np.concatenate([read, take]), np.concatenate([scores, _exact(T, parts, take)])
        done, chunk = done + len(take), 2 * chunk
        if done < len(ids) and len(scores) >= k:
            kth_exact = float(scores.max()) if k == 1 else float(np.partition(scores, -k)[-k])
            if kth_exact > bound[order[done]]:      # every unread token scores below k read ones
                break
    ids = read
    if np.count_nonzero(scores >= theta) < k:       # cannot happen (see above); never trust a broken proof
        return None
    return ids, scores


def _exact(T: np.ndarray, parts, ids: np.ndarray) -> np.ndarray:
    """Exact combined scores of target tokens ``ids``. (n,)"""
    scores = T[ids].astype(np.float32)
    for m, h, a in parts:
        scores += m.shift_at(h, a, ids)
    if not np.isfinite(scores).all():
        raise DeltaFault("non-finite combined scores", fix="re-export the bundle; check it with `cmc-edge inspect`")
    return scores
