"""Weights-only INT8 for the delta graph (onnxruntime dynamic quantization), and how it is checked.

``quant_pre_process`` (onnxruntime graph optimisation + shape inference) runs first, so every
weight feeding a ``MatMul`` is a folded constant that quantizes to an integer ``MatMul``. (When
the graph still held the tied embedding, skipping it made the table dequantize in full on every
step and INT8 slower than fp32; the embedding now lives outside the graph, in fp32.)

INT8 logits cannot match fp32 to 1e-4, so the check is behavioural, on what decoding uses: the
*centred* delta logits (the shift, at alpha 1). Over a fixed sequence (a prefill, then
single-token steps) the largest change INT8 makes to any token's shift must stay below
``max_shift_error`` (default 0.5 nats: no probability ratio in the combined model moves by more
than e^(2 x 0.5) = 2.7x; measured on the demo's filter: 0.03-0.06). Top-1 agreement, top-5 overlap
and the mean KL(fp32 || int8) are recorded but not enforced: a delta's logits on random ids
are near-flat, and their arg-max flips on 1e-3 changes (the demo filter retrained for 450 steps:
INT8's top token in fp32's top 5 at 92% of positions, with a largest shift change of 0.055).

Dynamic quantization scales the activations per call (one scale per tensor of S tokens), so INT8
logits also depend slightly (~1e-3) on how tokens are grouped into ``feed`` calls; fp32 does not.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from cmc_edge.combine import centred_np, log_softmax_np
from cmc_edge.errors import ExportValidationError
from cmc_edge.runtime.bundle import OnnxSpec

log = logging.getLogger(__name__)

# The check feeds a 24-token prefill, then single tokens: positions 0..39.
INT8_CHUNKS = (24,) + (1,) * 16
DEFAULT_MAX_SHIFT_ERROR = 0.5


def quantize_int8(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Pre-process then dynamically quantize ``fp32_path``'s weights to INT8 at ``out_path``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".preprocess.", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        # DefaultTensorType: the fused graph's contrib operators have no ONNX shape inference, so
        # the quantizer cannot type the tensors after them itself; they are all float32.
        quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=False,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    log.info("wrote INT8 graph %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path


def agreement(ref: np.ndarray, got: np.ndarray, k: int = 5) -> dict:
    """How closely ``got`` logits follow ``ref``, row by row. (N, V), (N, V) -> dict"""
    k = min(k, ref.shape[-1])
    top_ref = np.argpartition(-ref, k - 1, axis=-1)[:, :k]                          # (N, k)
    top_got = np.argpartition(-got, k - 1, axis=-1)[:, :k]                          # (N, k)
    am_got = got.argmax(-1)                                                         # (N,)
    lr, lg = log_softmax_np(ref.astype(np.float64)), log_softmax_np(got.astype(np.float64))
    return {
        "top1_agreement": float(np.mean(ref.argmax(-1) == am_got)),
        f"top1_in_top{k}": float(np.mean((top_ref == am_got[:, None]).any(-1))),
        f"top{k}_overlap": float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_got)])),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "mean_abs_diff": float(np.abs(got - ref).mean()),
        "mean_kl": float((np.exp(lr) * (lr - lg)).sum(-1).mean()),
    }


def compare_int8(fp32_path: str | Path, int8_path: str | Path, spec: OnnxSpec, embedding: np.ndarray, *,
                 max_shift_error: float = DEFAULT_MAX_SHIFT_ERROR) -> dict:
    """Agreement of the INT8 graph with the fp32 graph; raises if INT8 changes any token's centred
    delta logit (its shift at alpha 1) by more than ``max_shift_error`` nats."""
    from cmc_edge.export.onnx import onnx_logits, validation_ids

    ids = validation_ids(spec.vocab_size, sum(INT8_CHUNKS), seed=1)
    ref = onnx_logits(fp32_path, spec, embedding, ids, INT8_CHUNKS)      # (N, V)
    got = onnx_logits(int8_path, spec, embedding, ids, INT8_CHUNKS)      # (N, V)
    shift_error = float(np.abs(centred_np(got) - centred_np(ref)).max())   # the shift at alpha 1
    report = {**agreement(ref, got, k=5), "positions": len(ids), "shift_error": shift_error,
              "max_shift_error": max_shift_error}
    log.info("INT8 vs fp32: largest shift change %.3g nats, top-1 agreement %.3f, top-1 in top-5 %.3f",
             shift_error, report["top1_agreement"], report["top1_in_top5"])
    if not shift_error <= max_shift_error:          # also catches NaN
        raise ExportValidationError(
            f"the INT8 graph changes the delta's shift by up to {shift_error:.3g} nats over {len(ids)} positions "
            f"(allowed: {max_shift_error:g})", fix="use the fp32 variant (export with --no-int8)",
            max_abs_diff=shift_error, tolerance=max_shift_error)
    return report
