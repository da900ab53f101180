"""The combination rule: numpy and torch agree, and the runtime's in-place shift equals the reference."""

import numpy as np
import pytest

from cmc_edge.combine import add_mapped_shift_, combine_np, log_softmax_np, mapped_shift_np


def test_numpy_and_torch_agree():
    torch = pytest.importorskip("torch")
    from cmc_edge.combine import combine_torch

    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 5, 101)).astype(np.float32) * 4
    d = rng.normal(size=(3, 5, 101)).astype(np.float32)
    for alpha in (0.0, 0.5, 2.0):
        ref = combine_np(t, d, alpha)
        got = combine_torch(torch.from_numpy(t), torch.from_numpy(d), alpha).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_alpha_zero_is_the_template():
    t = np.array([[3.0, 1.0, -2.0]], np.float32)
    np.testing.assert_allclose(combine_np(t, np.full_like(t, 7.0), 0.0), log_softmax_np(t), atol=1e-6)


def test_raw_logit_shift_gives_the_same_distribution_as_the_paper_rule():
    """Softmax is shift-invariant: the runtime may add the shift to raw logits (no log_softmax)."""
    rng = np.random.default_rng(1)
    t = rng.normal(size=50).astype(np.float32) * 3
    d = rng.normal(size=50).astype(np.float32)
    paper = log_softmax_np(combine_np(t, d, 1.5))
    runtime = log_softmax_np(add_mapped_shift_(t.copy(), d, None, None, 1.5))
    np.testing.assert_allclose(runtime, paper, atol=1e-5)


def test_in_place_mapped_shift_matches_reference():
    rng = np.random.default_rng(2)
    d = rng.normal(size=40).astype(np.float32)
    index = rng.integers(0, 40, size=70).astype(np.int32)
    mask = rng.random(70) < 0.8
    ref = mapped_shift_np(d, index, mask, 0.7)
    assert np.all(ref[~mask] == 0)
    got = add_mapped_shift_(np.zeros(70, np.float32), d, np.flatnonzero(mask), index[mask], 0.7)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_shift_is_centred_so_unmapped_tokens_keep_the_average():
    d = np.array([1.0, 2.0, 3.0], np.float32)  # mean 2 -> centred [-1, 0, 1]
    s = mapped_shift_np(d, np.array([0, 2, 0]), np.array([True, True, False]), 1.0)
    np.testing.assert_allclose(s, [-1.0, 1.0, 0.0])
