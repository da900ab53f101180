"""The combination rule: numpy and torch agree, and the runtime's in-place shift equals the reference."""

import numpy as np
import pytest

from cmc_edge.combine import combine_np, log_softmax_np, mapped_shift_np


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


def test_shift_is_centred_so_unmapped_tokens_keep_the_average():
    d = np.array([1.0, 2.0, 3.0], np.float32)  # mean 2 -> centred [-1, 0, 1]
    s = mapped_shift_np(d, np.array([0, 2, 0]), np.array([True, True, False]), 1.0)
    np.testing.assert_allclose(s, [-1.0, 1.0, 0.0])


def test_centring_numpy_and_torch_agree_on_every_row():
    torch = pytest.importorskip("torch")
    from cmc_edge.combine import centred_np, centred_torch

    rng = np.random.default_rng(1)
    d = (rng.normal(size=(2, 3, 257)) * 5 + 40).astype(np.float32)      # a large common offset
    ref = centred_np(d)
    np.testing.assert_allclose(centred_torch(torch.from_numpy(d)).numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(ref.mean(-1), 0.0, atol=1e-4)             # each row centred on its own
    np.testing.assert_allclose(ref[1, 2], d[1, 2] - d[1, 2].mean(dtype=np.float64), atol=1e-5)
    np.testing.assert_array_equal(centred_np(d[0, 0]), ref[0, 0])        # one row = that row of a batch


def test_centring_is_the_shift_at_alpha_one():
    from cmc_edge.combine import centred_np

    d = np.array([0.5, -1.0, 4.0, 2.5], np.float32)
    s = mapped_shift_np(d, np.arange(4), np.ones(4, bool), 1.0)
    np.testing.assert_array_equal(s, centred_np(d))
