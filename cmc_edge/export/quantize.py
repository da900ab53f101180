"""Weights-only INT8 for the delta graph (onnxruntime dynamic quantization), and how it is checked.

Order matters: ``quant_pre_process`` runs first. The delta ties its input and output
embeddings, so the exported graph computes the LM head as ``MatMul(h, Transpose(E))``.
Quantized as is, the head's weight is not a constant, the shared table is quantized once
for the ``Gather`` and *dequantized in full on every step* to feed the transpose: INT8 ends up
slower than fp32. The pre-process pass (onnxruntime graph optimisation + shape inference)
folds ``Transpose(E)`` into its own constant, so the head becomes an integer ``MatMul`` and the
embedding lookup dequantizes only the rows it gathers.

INT8 logits cannot match fp32 to 1e-4, so the check is behavioural. Over a fixed sequence
(a prefill, then single-token steps) the export requires INT8's top token to be among fp32's
top 5 at >= 95% of positions. Exact top-1 agreement is recorded but not enforced: an untrained
or lightly trained delta has near-flat logits whose arg-max flips on 1e-3 changes (15m preset,
random weights: top-1 agreement 0.875-1.0 across seeds, top-1-in-top-5 1.0 on every seed).
Also recorded: top-5 overlap, max and mean |int8 - fp32|, and the mean KL(fp32 || int8).

Dynamic quantization scales the activations per call (one scale per tensor of S tokens), so INT8
logits also depend slightly (~1e-3) on how tokens are grouped into ``feed`` calls; fp32 does not.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from cmc_edge.errors import ExportValidationError
from cmc_edge.runtime.bundle import OnnxSpec

log = logging.getLogger(__name__)

# The check feeds a 24-token prefill, then single tokens: positions 0..39.
INT8_CHUNKS = (24,) + (1,) * 16
DEFAULT_MIN_TOP5_HIT = 0.95


def quantize_int8(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Pre-process then dynamically quantize ``fp32_path``'s weights to INT8 at ``out_path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".preprocess.", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=False,
                         extra_options={"MatMulConstBOnly": True})
    log.info("wrote INT8 graph %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def agreement(ref: np.ndarray, got: np.ndarray, k: int = 5) -> dict:
    """How closely ``got`` logits follow ``ref``, row by row. (N, V), (N, V) -> dict"""
    k = min(k, ref.shape[-1])
    top_ref = np.argpartition(-ref, k - 1, axis=-1)[:, :k]                          # (N, k)
    top_got = np.argpartition(-got, k - 1, axis=-1)[:, :k]                          # (N, k)
    am_got = got.argmax(-1)                                                         # (N,)
    lr, lg = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
    return {
        "top1_agreement": float(np.mean(ref.argmax(-1) == am_got)),
        f"top1_in_top{k}": float(np.mean((top_ref == am_got[:, None]).any(-1))),
        f"top{k}_overlap": float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_got)])),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "mean_abs_diff": float(np.abs(got - ref).mean()),
        "mean_kl": float((np.exp(lr) * (lr - lg)).sum(-1).mean()),
    }


def compare_int8(fp32_path: str | Path, int8_path: str | Path, spec: OnnxSpec, *,
                 min_top5_hit: float = DEFAULT_MIN_TOP5_HIT) -> dict:
    """Agreement of the INT8 graph with the fp32 graph; raises if INT8's top token leaves fp32's
    top 5 at more than ``1 - min_top5_hit`` of the positions."""
    from cmc_edge.export.onnx import onnx_logits, validation_ids

    ids = validation_ids(spec.vocab_size, sum(INT8_CHUNKS), seed=1)
    ref = onnx_logits(fp32_path, spec, ids, INT8_CHUNKS)                 # (N, V)
    got = onnx_logits(int8_path, spec, ids, INT8_CHUNKS)                 # (N, V)
    report = {**agreement(ref, got, k=5), "positions": len(ids), "min_top1_in_top5": min_top5_hit}
    log.info("INT8 vs fp32: top-1 agreement %.3f, top-1 in top-5 %.3f, max |diff| %.3g",
             report["top1_agreement"], report["top1_in_top5"], report["max_abs_diff"])
    if not report["top1_in_top5"] >= min_top5_hit:
        raise ExportValidationError(
            f"the INT8 graph's top token is in fp32's top 5 at only {report['top1_in_top5']:.0%} of "
            f"{len(ids)} positions (required: {min_top5_hit:.0%}; max |int8 - fp32| {report['max_abs_diff']:.3g})",
            fix="use the fp32 variant (export with --no-int8)",
            max_abs_diff=report["max_abs_diff"], tolerance=min_top5_hit)
    return report
