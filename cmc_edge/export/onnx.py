"""Torch -> ONNX: the delta's forward pass with an explicit KV cache, and its validation.

Graph interface (batch 1, no padding; :class:`cmc_edge.runtime.bundle.OnnxSpec`)::

    inputs_embeds float32 (1, S, d)       position_ids  int64   (1, S)
    past_key_i    float32 (1, H, P, Dh)   past_value_i  float32 (1, H, P, Dh)     i < num_layers
    -> hidden     float32 (1, S, d)       the final (normed) hidden state
    -> present_key_i / present_value_i    float32 (1, H, P+S, Dh)

S and P are dynamic (P may be 0: the prefill). The tied embedding ``E`` (V, d) is not in the
graph: it is saved beside it (``embedding.npy``) and the runtime applies it on both ends, the
lookup ``E[ids]`` before the graph and the output layer ``z = E @ h`` after it
(:mod:`cmc_edge.runtime.shift`). The output layer is most of a small delta's weights (12.6M of
16M parameters for the 15m preset over a 49k vocabulary); outside the graph the runtime computes it
only for the target tokens the sampler can still pick, and the table is held in memory once.

Two writers produce this interface: :mod:`cmc_edge.export.fused` writes the delta's layers with
onnxruntime's fused operators (the default wherever it covers the model: a quarter of the nodes,
a faster step), and ``torch.onnx.export`` traces any HF causal LM (below). Both are validated the
same way.

How the cache gets through ``torch.export``: :class:`KVCacheWrapper` takes the past as plain
tensors, builds a ``transformers.DynamicCache`` *inside* the traced function, calls the HF
model's public ``forward`` and returns the updated layers' tensors. The cache object never
crosses the graph boundary, so it needs no pytree registration (transformers'
``exporters.exporter_dynamo.register_cache_pytrees_for_model`` exists for the case where it
does) and nothing of Llama's forward is copied. Non-strict ``torch.export`` runs
``DynamicCache``'s Python (``torch.cat`` onto the past) and records the tensor ops only.

The sample inputs use P=4, S=3: torch.export specialises sizes 0 and 1, so tracing with P=0
or S=1 would bake those sizes in. The graph then runs for P=0 and S=1 too (validated below).

Validation runs the graph in onnxruntime through the runtime's own session class
(:class:`cmc_edge.runtime.onnx_delta.OnnxDelta`: the code path generation uses) over a
prefill and several incremental steps, and compares every position with PyTorch's
full-sequence forward.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from cmc_edge.errors import ExportValidationError, InputError
from cmc_edge.runtime.bundle import OnnxSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
Graph = Literal["auto", "fused", "fused-mha", "torch"]
# Prefill of 7, then incremental steps of 1, 3 and 1 tokens (P = 7, 8, 11).
VALIDATION_CHUNKS = (7, 1, 3, 1)


def onnx_spec(config) -> OnnxSpec:
    """The graph interface for an HF Llama config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return OnnxSpec.for_layers(num_layers=config.num_hidden_layers,
                               num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
                               vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
                               hidden_size=config.hidden_size)


def embedding_table(model) -> np.ndarray:
    """The delta's tied embedding / output matrix, float32. (V, d)"""
    if not getattr(model.config, "tie_word_embeddings", False):
        raise ExportValidationError("the delta's output layer is not tied to its input embedding",
                                    fix="train deltas with `cmc-edge train` (its models tie them)")
    return model.get_input_embeddings().weight.detach().float().cpu().numpy()


class KVCacheWrapper(torch.nn.Module):
    """``(inputs_embeds, position_ids, *past) -> (hidden, *present)`` around an HF causal LM."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, inputs_embeds, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model.model(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=cache,
                               use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]                      # (1, H, P+S, Dh) each
        return (out.last_hidden_state.float(), *present)               # (1, S, d), ...


def choose_graph(config, graph: Graph = "auto") -> Literal["fused", "fused-mha", "torch"]:
    """Which writer exports this model: ``auto`` is the fused graph wherever it covers the model
    (its GroupQueryAttention form where that covers it, else the MultiHeadAttention form)."""
    from cmc_edge.export.fused import gqa_unsupported, unsupported

    if graph not in ("auto", "fused", "fused-mha", "torch"):
        raise InputError(f"unknown graph writer {graph!r}", fix="use --graph auto, fused, fused-mha or torch")
    why = unsupported(config) if graph != "torch" else None
    if graph in ("fused", "fused-mha") and why:
        raise InputError(f"the fused graph does not cover this delta ({why})", fix="export with --graph torch")
    if graph == "auto" and why:
        log.info("fused graph not available (%s): exporting with torch.onnx.export", why)
    if graph == "torch" or why:
        return "torch"
    if graph == "fused-mha":
        return graph
    why_gqa = gqa_unsupported(config)
    if why_gqa:
        log.info("GroupQueryAttention does not cover this delta (%s): writing the MultiHeadAttention form", why_gqa)
        return "fused-mha"
    return "fused"


def export_onnx(model, path: str | Path, *, opset: int = DEFAULT_OPSET, graph: Graph = "auto") -> OnnxSpec:
    """Export ``model`` (an HF causal LM, eval mode, fp32) to a single-file ONNX graph at ``path``.

    ``graph``: ``fused`` writes onnxruntime's fused operators (:mod:`cmc_edge.export.fused`;
    ``fused-mha`` its MultiHeadAttention form, for the CUDA provider), ``torch`` traces the model
    with ``torch.onnx.export``, ``auto`` the first that covers it."""
    spec = onnx_spec(model.config)
    chosen = choose_graph(model.config, graph)
    if chosen in ("fused", "fused-mha"):
        from cmc_edge.export.fused import write_fused_graph

        log.info("writing %d-layer delta as a fused ONNX graph (%s, opset %d)", spec.num_layers, chosen, opset)
        return write_fused_graph(model, path, spec, opset=opset, attention="gqa" if chosen == "fused" else "mha")
    wrapper = KVCacheWrapper(model).eval()
    P, S = 4, 3
    past = [torch.zeros(1, spec.num_kv_heads, P, spec.head_dim) for _ in spec.past_names]      # (1, H, P, Dh)
    inputs_embeds = torch.zeros(1, S, spec.hidden_size)                                        # (1, S, d)
    position_ids = torch.arange(P, P + S).unsqueeze(0)                                         # (1, S)
    s_dim = torch.export.Dim("S", min=1, max=spec.max_positions)
    p_dim = torch.export.Dim("P", min=0, max=spec.max_positions)
    dynamic_shapes = {"inputs_embeds": {1: s_dim}, "position_ids": {1: s_dim},
                      "past": tuple({2: p_dim} for _ in spec.past_names)}
    log.info("exporting %d-layer delta to ONNX (opset %d)", spec.num_layers, opset)
    with torch.no_grad(), warnings.catch_warnings():
        # S and P appear in several inputs; the exporter says so once per input. Benign.
        warnings.filterwarnings("ignore", message=r".*axis name: [SP] will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        torch.onnx.export(wrapper, (inputs_embeds, position_ids, *past), str(path), dynamo=True,
                          input_names=list(spec.input_names), output_names=list(spec.output_names),
                          dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False,
                          verbose=False, optimize=True)
    return spec


def validation_ids(vocab_size: int, n: int, seed: int = 0) -> np.ndarray:
    """The fixed token ids the export is validated on. (n,)"""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n, dtype=np.int64)


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """PyTorch's full-sequence logits, no cache. (N,) -> (N, V)"""
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)[None]).logits[0].float().numpy()


def onnx_logits(onnx_path: str | Path, spec: OnnxSpec, embedding: np.ndarray, ids: np.ndarray,
                chunks: Sequence[int]) -> np.ndarray:
    """onnxruntime's logits (graph + output layer) for ``ids`` fed in ``chunks`` through the KV
    cache (CPU). (N,) -> (N, V)"""
    from cmc_edge.runtime.onnx_delta import OnnxDelta
    from cmc_edge.runtime.shift import DeltaHead

    delta = OnnxDelta.from_file(onnx_path, spec, DeltaHead(embedding), providers=["CPUExecutionProvider"])
    out, n = [], 0
    for c in chunks:
        out.append(delta.feed_all(ids[n:n + c]))                       # (c, V)
        n += c
    return np.concatenate(out)


def validate_onnx(model, onnx_path: str | Path, spec: OnnxSpec, embedding: np.ndarray, *, tolerance: float,
                  chunks: Sequence[int] = VALIDATION_CHUNKS) -> dict:
    """Compare onnxruntime with PyTorch on a prefill plus incremental steps.

    Returns ``{"max_abs_diff", "tolerance", "chunks"}``; raises :class:`ExportValidationError`
    when ``max |ONNX - PyTorch|`` over every position and logit exceeds ``tolerance``.
    """
    ids = validation_ids(spec.vocab_size, sum(chunks))
    ref = reference_logits(model, ids)
    got = onnx_logits(onnx_path, spec, embedding, ids, chunks)
    diff = float(np.abs(got - ref).max())
    log.info("ONNX vs PyTorch: max |diff| %.3g (tolerance %.3g)", diff, tolerance)
    if not diff <= tolerance:               # also catches NaN
        raise ExportValidationError(
            f"the ONNX graph differs from PyTorch by up to {diff:.3g} (tolerance {tolerance:.3g}) "
            f"over a prefill and incremental steps {list(chunks)}",
            fix="check the torch/onnxscript/onnxruntime versions, or raise --tolerance if the gap is benign",
            max_abs_diff=diff, tolerance=tolerance)
    return {"max_abs_diff": diff, "tolerance": tolerance, "chunks": list(chunks)}
