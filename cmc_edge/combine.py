"""The one source of truth for CMC's logit arithmetic, in numpy and in torch side by side.

The combined next-token scores of the paper are::

    scores = log_softmax(template_logits) + alpha * delta_logits          # (..., V)

Training, export validation and the runtime all call this module. At decode time the
runtime adds the *mapped* shift straight to the target LLM's raw logits: softmax is
shift-invariant, so ``softmax(T + s) == softmax(log_softmax(T) + s)`` and no full-vocabulary
log_softmax is needed (:mod:`cmc_edge.runtime.shift` adds it in place). The delta's logits
are centred (mean over the delta vocabulary subtracted) before mapping, so that a target token
without a counterpart (shift 0) keeps the delta's *average* preference instead of an
arbitrary absolute level. Both rules are written here once: :func:`combine_np` /
:func:`combine_torch` and :func:`centred_np` / :func:`centred_torch`. Training's loss terms
(:mod:`cmc_edge.train.objectives`: the avoid hinge and the L2 terms act on the centred delta
logits, which are the shift at alpha 1), the INT8 check at export, and the runtime's shift all
use them; the runtime's in-place fast paths (``E[rows] @ h - mean_row @ h`` for a few tokens) are
the same centring by linearity and are tested equal to :func:`mapped_shift_np`.

>>> import numpy as np
>>> t = np.array([[2.0, 1.0, 0.0]], dtype=np.float32)
>>> d = np.array([[0.0, 0.0, 3.0]], dtype=np.float32)
>>> combine_np(t, d, 0.0).round(3).tolist() == log_softmax_np(t).round(3).tolist()
True
"""

from __future__ import annotations

import numpy as np


def log_softmax_np(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Normalised log-probs along ``axis``: float64 in, float64 out; anything else in, float32 out."""
    x = np.asarray(x)
    x = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def combine_np(template_logits: np.ndarray, delta_logits: np.ndarray, alpha: float) -> np.ndarray:
    """``log_softmax(template) + alpha * delta`` on the template's own vocabulary. (..., V)"""
    return log_softmax_np(template_logits) + np.float32(alpha) * np.asarray(delta_logits, np.float32)


def combine_torch(template_logits, delta_logits, alpha: float):
    """Torch twin of :func:`combine_np` (differentiable in ``delta_logits``). (..., V)"""
    import torch

    return torch.log_softmax(template_logits.float(), dim=-1) + alpha * delta_logits.float()


def centred_np(delta_logits: np.ndarray) -> np.ndarray:
    """Delta logits minus their mean over the delta vocabulary (the last axis; the mean is
    accumulated in float64). (..., V_d) -> (..., V_d) float32"""
    d = np.asarray(delta_logits, dtype=np.float32)
    return d - d.mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)


def centred_torch(delta_logits):
    """Torch twin of :func:`centred_np` (differentiable; the mean in the input's precision, as
    training has always computed it). (..., V_d) -> (..., V_d)"""
    return delta_logits - delta_logits.mean(-1, keepdim=True)


def floored_np(shift: np.ndarray, floor: float) -> np.ndarray:
    """The shift with every entry smaller than ``floor`` in magnitude set to 0 (``floor`` 0: unchanged).

    A delta trained to stay silent outside what it teaches is never exactly silent: it leaves
    shifts of a tenth of a nat over tokens its template never puts weight on, where KL to the
    template cannot see them. Another LLM may sit at a near tie exactly there (Gemma 3 base between
    its answer and the newline that ends it), and a tenth of a nat flips it. The floor drops
    those shifts and keeps the ones the delta was trained to make (an avoided answer sits several
    nats down). It is applied to the shift actually added, after alpha, per delta.

    >>> floored_np(np.array([0.1, -0.3, 2.0], np.float32), 0.25).tolist()
    [0.0, -0.30000001192092896, 2.0]
    """
    s = np.asarray(shift, np.float32)
    if not floor:
        return s
    return np.where(np.abs(s) >= np.float32(floor), s, np.float32(0.0)).astype(np.float32)


def mapped_shift_np(delta_logits: np.ndarray, index: np.ndarray, mask: np.ndarray,
                    alpha: float, floor: float = 0.0) -> np.ndarray:
    """The shift CMC adds to a target LLM's logits. (V_d,) -> (V_t,)

    ``index[t]`` is the delta token that target token ``t`` maps to, ``mask[t]`` whether it maps
    at all; unmapped tokens get 0; with a ``floor`` (:func:`floored_np`) shifts smaller than it get
    0 too. This is the reference form; the runtime's in-place variants (:mod:`cmc_edge.runtime.shift`,
    full and top-k) must agree with it (tested).
    """
    d = centred_np(delta_logits)
    return floored_np(np.where(mask, np.float32(alpha) * d[index], np.float32(0.0)), floor)
