"""The delta's step graph written directly with onnxruntime's fused transformer operators.

``torch.onnx.export`` spells a Llama layer out in ~60 primitive nodes (RMSNorm as pow/mean/
rsqrt/mul, rotary as slices and concats, attention as matmuls, masks and a softmax). For a 15M
delta one decode step is a few hundred microseconds of arithmetic, so per-node dispatch and the
intermediate tensors are a large part of its cost. This module writes the same computation with
onnxruntime's contrib operators, 11 nodes a layer (``attention="gqa"``, the default)::

    h   = SkipSimplifiedLayerNormalization(previous block, residual)       (RMSNorm + residual add)
    qkv = MatMul(h, [Wq Wk Wv])                                              (one packed projection)
    a, present_k, present_v = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, total_len,
                                                  cos_cache, sin_cache, do_rotary=1)
    ... SkipSimplifiedLayerNormalization, MatMul([Wgate Wup]), Split, x*sigmoid(x)*up, MatMul(Wdown)

``GroupQueryAttention`` applies the rotary embedding itself (positions from ``seqlens_k``, which
the graph derives from ``position_ids``) and, when its past and present are one buffer of
``max_positions`` slots, writes the new keys and values in place instead of copying the whole
cache into a new tensor every step (``OnnxSpec.kv_cache == "shared"``; the runtime binds it that
way, see :mod:`cmc_edge.runtime.onnx_delta`). Measured on the demo's INT8 delta with cold caches
(llama.cpp evicts them between steps): 1.09 ms a step at 160 cached tokens against 1.37 ms for the
MultiHeadAttention graph, 1.08 against 1.41 at 300. The same graph also runs with a growing past
(``kv_cache == "concat"``), so a runtime that does not share the buffer still gets exact results.

``attention="mha"`` writes ``RotaryEmbedding`` + ``MultiHeadAttention`` (14 nodes a layer, the
cache copied every step) instead: onnxruntime's CUDA provider has float32 kernels for those two
and only half-precision ones for ``GroupQueryAttention``, so a delta meant for the CUDA provider
is exported with ``--graph fused-mha``. (Validated on CPU; the CUDA path has not been run here.)

The interface is the exporter's (:class:`cmc_edge.runtime.bundle.OnnxSpec`), and the export is
validated against PyTorch the same way whichever writer made it.

It covers the delta architecture ``cmc-edge train`` builds (Llama: RMSNorm, SiLU MLP, default
RoPE, no biases, as many key/value heads as query heads); :func:`unsupported` says why another
model is not covered, and the exporter then uses ``torch.onnx.export``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from cmc_edge.runtime.bundle import OnnxSpec

MS = "com.microsoft"


def unsupported(config) -> str | None:
    """Why this HF config cannot be written as a fused graph, or None when it can."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                         "rope_theta": getattr(config, "rope_theta", None)}
    checks = [
        (getattr(config, "model_type", None) == "llama", f"model type {getattr(config, 'model_type', None)!r}"),
        (getattr(config, "hidden_act", None) == "silu", f"activation {getattr(config, 'hidden_act', None)!r}"),
        (not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False), "biases"),
        (rope.get("rope_type", "default") == "default" and rope.get("rope_theta"), f"RoPE scaling {rope}"),
        (config.num_key_value_heads == config.num_attention_heads, "grouped key/value heads"),
        ((getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
         * config.num_attention_heads == config.hidden_size, "a head size that does not tile the hidden size"),
    ]
    reasons = [why for ok, why in checks if not ok]
    return ", ".join(reasons) if reasons else None


def gqa_unsupported(config) -> str | None:
    """Why the GroupQueryAttention form cannot be written (its in-operator rotary needs a head size
    that is a multiple of 16), or None."""
    dh = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return f"head size {dh}, not a multiple of 16" if dh % 16 else None


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position x inverse frequency, as HF Llama's default RoPE. (P, Dh/2) each"""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)         # (Dh/2,)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv)                     # (P, Dh/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def write_fused_graph(model, path: str | Path, spec: OnnxSpec, *, opset: int,
                      attention: Literal["gqa", "mha"] = "gqa") -> OnnxSpec:
    """Write ``model`` (an HF Llama causal LM, see :func:`unsupported`) as a fused step graph;
    return ``spec`` with the cache style the graph supports."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    d, n_layers, heads, dh = spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.head_dim
    eps = float(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    w = {k: v.detach().float().cpu().numpy() for k, v in model.model.state_dict().items()}
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(name: str) -> str:
        """A torch Linear's weight (out, in) as a MatMul's right operand (in, out); norms as they are."""
        return const(name, w[name].T if w[name].ndim == 2 else w[name])

    def packed(name: str, parts: list[str]) -> str:
        """Several Linear weights side by side: one MatMul instead of several. (in, sum of outs)"""
        return const(name, np.concatenate([w[n] for n in parts]).T)

    def node(op: str, ins: list[str], outs: list[str], **attrs) -> None:
        domain = MS if op in ("SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MultiHeadAttention",
                              "GroupQueryAttention") else ""
        nodes.append(helper.make_node(op, ins, outs, domain=domain, name=f"{outs[0]}/{op}", **attrs))

    cos, sin = rope_tables(dh, float(rope["rope_theta"]), spec.max_positions)
    const("cos_cache", cos)
    const("sin_cache", sin)
    if attention == "gqa":
        # GroupQueryAttention's lengths: seqlens_k = the last position (total - 1), shape (1,), and
        # total_sequence_length, a scalar; both int32, both from position_ids (consecutive, batch 1).
        const("last", np.array(-1, np.int64))
        const("one", np.array([1], np.int64))
        node("Gather", [spec.input_names[1], "last"], ["last_pos"], axis=1)                 # (1,)
        node("Cast", ["last_pos"], ["seqlens_k"], to=TensorProto.INT32)
        node("Add", ["last_pos", "one"], ["total_len64"])
        node("Squeeze", ["total_len64"], ["total_len64s"])
        node("Cast", ["total_len64s"], ["total_len"], to=TensorProto.INT32)
    else:
        const("qkv_sizes", np.array([d, d, d], np.int64))
    x, block = spec.input_names[0], None             # the residual stream; the last block's output
    for i in range(n_layers):
        p = f"layers.{i}."
        if block is None:
            node("SimplifiedLayerNormalization", [x, weight(p + "input_layernorm.weight")], [f"h{i}"],
                 epsilon=eps, axis=-1)
        else:                                        # h = norm(x + block); x + block is the new residual
            node("SkipSimplifiedLayerNormalization", [block, x, weight(p + "input_layernorm.weight")],
                 [f"h{i}", "", "", f"res{i}"], epsilon=eps)
            x = f"res{i}"
        qkv = packed(p + "self_attn.qkv_proj.weight", [p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        node("MatMul", [f"h{i}", qkv], [f"qkv{i}"])                                          # (1, S, 3d)
        past, present = spec.past_names[2 * i:2 * i + 2], spec.present_names[2 * i:2 * i + 2]
        if attention == "gqa":
            node("GroupQueryAttention", [f"qkv{i}", "", "", *past, "seqlens_k", "total_len", "cos_cache", "sin_cache"],
                 [f"att{i}", *present], num_heads=heads, kv_num_heads=heads, scale=float(dh ** -0.5),
                 do_rotary=1, rotary_interleaved=0)
        else:
            node("Split", [f"qkv{i}", "qkv_sizes"], [f"q{i}", f"k{i}", f"v{i}"], axis=-1)
            for t in "qk":
                node("RotaryEmbedding", [f"{t}{i}", spec.input_names[1], "cos_cache", "sin_cache"], [f"{t}r{i}"],
                     num_heads=heads, interleaved=0)
            node("MultiHeadAttention", [f"qr{i}", f"kr{i}", f"v{i}", "", "", "", *past], [f"att{i}", *present],
                 num_heads=heads, unidirectional=1, scale=float(dh ** -0.5))
        node("MatMul", [f"att{i}", weight(p + "self_attn.o_proj.weight")], [f"o{i}"])
        node("SkipSimplifiedLayerNormalization", [f"o{i}", x, weight(p + "post_attention_layernorm.weight")],
             [f"h2_{i}", "", "", f"mid{i}"], epsilon=eps)
        gate_up = packed(p + "mlp.gate_up_proj.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        node("MatMul", [f"h2_{i}", gate_up], [f"gu{i}"])                                     # (1, S, 2I)
        node("Split", [f"gu{i}"], [f"g{i}", f"u{i}"], axis=-1, num_outputs=2)
        node("Sigmoid", [f"g{i}"], [f"sg{i}"])
        node("Mul", [f"g{i}", f"sg{i}"], [f"silu{i}"])
        node("Mul", [f"silu{i}", f"u{i}"], [f"act{i}"])
        node("MatMul", [f"act{i}", weight(p + "mlp.down_proj.weight")], [f"down{i}"])
        x, block = f"mid{i}", f"down{i}"
    node("SkipSimplifiedLayerNormalization", [block, x, weight("norm.weight")], [spec.output_names[0]], epsilon=eps)

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(spec.input_names[0], f32, [1, "S", d]),
              helper.make_tensor_value_info(spec.input_names[1], TensorProto.INT64, [1, "S"])]
    inputs += [helper.make_tensor_value_info(n, f32, [1, heads, "P", dh]) for n in spec.past_names]
    outputs = [helper.make_tensor_value_info(spec.output_names[0], f32, [1, "S", d])]
    outputs += [helper.make_tensor_value_info(n, f32, [1, heads, "T", dh]) for n in spec.present_names]
    graph = helper.make_graph(nodes, "cmc_edge_delta", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                          producer_name="cmc-edge")
    onnx.save(m, str(path))
    return replace(spec, kv_cache="shared" if attention == "gqa" else "concat")
