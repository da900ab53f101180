"""The runtime's ONNX delta session: KV-cache stepping, rollback by slicing, faults, and no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cmc_edge.errors import DeltaFault, InputError
from cmc_edge.runtime.bundle import load_bundle
from cmc_edge.runtime.onnx_delta import OnnxDelta
from cmc_edge.runtime.shift import DeltaHead
from tiny_checkpoint import make_tiny_bundle

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("b") / "bundle"))


def ids_(bundle, n, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(0, bundle.onnx.vocab_size, n)]


def test_feed_then_rollback_equals_feeding_from_scratch(bundle):
    seq = ids_(bundle, 12)
    delta = OnnxDelta(bundle, "fp32", providers=CPU)
    delta.feed(seq[:8])
    delta.feed(seq[8:10])
    assert delta.n_past == 10
    delta.rollback(5)                                   # re-segmented tail: keep 5, feed the rest again
    assert delta.n_past == 5
    got = delta.feed([seq[11], seq[3]])
    fresh = OnnxDelta(bundle, "fp32", providers=CPU)
    want = fresh.feed(seq[:5] + [seq[11], seq[3]])
    assert got.shape == (bundle.onnx.hidden_size,) and got.dtype == np.float32       # the final hidden state
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert delta.n_past == fresh.n_past == 7


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_rollback_forgets_exactly_what_it_drops(bundle, variant):
    """INT8 quantizes activations per call (one scale per tensor of S tokens), so its logits depend
    slightly on how tokens were grouped into calls; compare paths with the same grouping."""
    seq = ids_(bundle, 12, seed=4)
    a = OnnxDelta(bundle, variant, providers=CPU)
    a.feed(seq[:8])
    a.feed(seq[8:11])
    a.rollback(6)
    b = OnnxDelta(bundle, variant, providers=CPU)
    b.feed(seq[:8])
    b.rollback(6)
    np.testing.assert_array_equal(a.feed([seq[11]]), b.feed([seq[11]]))


def test_feed_returns_the_last_row_of_feed_all(bundle):
    seq = ids_(bundle, 6, seed=1)
    a = OnnxDelta(bundle, providers=CPU)
    b = OnnxDelta(bundle, providers=CPU)
    all_rows = a.feed_all(seq)
    assert all_rows.shape == (6, bundle.onnx.vocab_size)
    np.testing.assert_allclose(b.head.logits(b.feed(seq)), all_rows[-1], atol=1e-6, rtol=0)


def test_token_by_token_equals_one_prefill(bundle):
    # fp32 only: dynamic INT8 quantizes activations with one scale per call, so a prefill and
    # single steps see different scales (close, not equal)
    seq = ids_(bundle, 9, seed=2)
    step = OnnxDelta(bundle, "fp32", providers=CPU)
    rows = [step.feed([t]) for t in seq]
    whole = OnnxDelta(bundle, "fp32", providers=CPU).feed_all(seq)
    np.testing.assert_allclose(step.head.logits(np.stack(rows)), whole, atol=1e-5, rtol=0)


def test_reset_and_rollback_to_zero_start_over(bundle):
    seq = ids_(bundle, 5, seed=3)
    delta = OnnxDelta(bundle, providers=CPU)
    first = delta.feed(seq)
    delta.reset()
    assert delta.n_past == 0
    np.testing.assert_array_equal(delta.feed(seq), first)
    delta.rollback(0)
    np.testing.assert_array_equal(delta.feed(seq), first)
    delta.rollback(delta.n_past)                        # a no-op
    assert delta.n_past == 5


@pytest.mark.parametrize("action, problem", [
    (lambda d: d.feed([]), "at least one token"),
    (lambda d: d.feed([-1]), "out of range"),
    (lambda d: d.feed([10**6]), "out of range"),
    (lambda d: d.rollback(3), "holds 0"),
    (lambda d: d.rollback(-1), "holds 0"),
    (lambda d: d.feed([1] * (d.max_positions + 1)), "at most"),
])
def test_bad_calls(bundle, action, problem):
    delta = OnnxDelta(bundle, providers=CPU)
    with pytest.raises(InputError, match=problem) as info:
        action(delta)
    assert info.value.fix and delta.n_past == 0


def test_missing_variant_and_bad_threads(bundle):
    import dataclasses

    b = dataclasses.replace(bundle, models={"fp32": bundle.models["fp32"]})       # as with --no-int8
    with pytest.raises(InputError, match="no 'int8' model") as info:
        OnnxDelta(b, "int8")
    assert "--no-int8" in info.value.fix
    with pytest.raises(InputError, match="threads"):
        OnnxDelta(b, threads=0)


def test_non_finite_logits_raise_delta_fault(bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle.model_path("fp32")))
    for init in model.graph.initializer:
        if init.name.endswith("norm.weight"):
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32),
                                                  init.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    delta = OnnxDelta.from_file(tmp_path / "nan.onnx", bundle.onnx, DeltaHead(bundle.load_embedding()), providers=CPU)
    with pytest.raises(DeltaFault, match="non-finite") as info:
        delta.feed([1, 2, 3])
    assert info.value.fix and delta.n_past == 0         # a failed step does not advance the cache


def test_default_providers_run_on_cpu_here(bundle):
    import onnxruntime as ort

    delta = OnnxDelta(bundle)
    assert delta.providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert delta.providers[0] == "CUDAExecutionProvider"


def test_runtime_modules_import_no_torch():
    code = ("import sys, cmc_edge.runtime.onnx_delta, cmc_edge.runtime.bundle; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
