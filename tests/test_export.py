"""Export stage: ONNX with KV cache matches PyTorch, INT8 is checked, the bundle is atomic and self-describing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cmc_edge.artifacts import sha256_file
from cmc_edge.errors import ArtifactError, ExportValidationError, InputError
from cmc_edge.export import export_bundle, read_checkpoint
from cmc_edge.runtime.bundle import COMBINATION, load_bundle
from cmc_edge.runtime.onnx_delta import OnnxDelta
from tiny_checkpoint import make_tiny_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def bundle_dir(checkpoint, tmp_path_factory):
    return export_bundle(checkpoint, tmp_path_factory.mktemp("out") / "bundle", tolerance=TOL)


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint).eval()


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()           # (N, V)


@pytest.fixture(scope="module")
def torch_graph_bundle(checkpoint, tmp_path_factory):
    return export_bundle(checkpoint, tmp_path_factory.mktemp("out") / "bundle", tolerance=TOL, int8=False,
                         graph="torch")


@pytest.mark.parametrize("graph", ["fused", "torch"])
@pytest.mark.parametrize("chunks", [(7,), (7, 1), (7, 3), (7, 1, 3, 1, 1), (1, 1, 2)])
def test_onnx_matches_pytorch_prefill_and_incremental(bundle_dir, torch_graph_bundle, torch_model, chunks, graph):
    b = load_bundle(bundle_dir if graph == "fused" else torch_graph_bundle)
    assert b.manifest["onnx"]["graph"] == graph
    ids = [int(i) for i in np.random.default_rng(5).integers(0, b.onnx.vocab_size, sum(chunks))]
    ref = torch_logits(torch_model, ids)
    assert ref.std() > 0.05                          # the tiny delta is not the all-zero no-op
    delta = OnnxDelta(b, "fp32", providers=["CPUExecutionProvider"])
    n = 0
    for c in chunks:                                 # P = n cached tokens, S = c new ones
        got = delta.feed_all(ids[n:n + c])
        np.testing.assert_allclose(got, ref[n:n + c], atol=TOL, rtol=0)
        n += c
    assert delta.n_past == len(ids)


def test_manifest_describes_the_bundle(bundle_dir, checkpoint):
    from cmc_edge.tokenmap import read_tokenizer_json

    meta = json.loads((checkpoint / "cmc.json").read_text())
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert (m["format"], m["format_version"], m["combination"]) == ("cmc-edge-bundle", 2, COMBINATION)
    assert b.default_alpha == meta["alpha"] == 1.5
    assert b.prompt_format == meta["prompt_format"] and m["template"] == meta["template"]
    assert m["delta_config"] == meta["delta_config"]
    assert b.delta_vocab_hash == read_tokenizer_json(checkpoint / "tokenizer.json").hash
    assert (b.onnx.num_layers, b.onnx.num_kv_heads, b.onnx.head_dim) == (2, 2, 16)
    assert b.onnx.vocab_size == meta["delta_config"]["vocab_size"] and b.max_positions == 128
    assert set(b.models) == {"fp32", "int8"}
    assert {"delta.onnx", "delta.int8.onnx", "embedding.npy", "tokenizer.json", "tokenizer_config.json"} <= set(m["files"])
    E = b.load_embedding()                              # the tied table, outside the graph, read without pickle
    assert E.shape == (b.onnx.vocab_size, b.onnx.hidden_size) == (meta["delta_config"]["vocab_size"], 32)
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    np.testing.assert_array_equal(E, model.get_input_embeddings().weight.detach().numpy())
    assert all(sha256_file(bundle_dir / n) == h for n, h in m["files"].items())
    assert 0 <= m["validation"]["max_abs_diff"] <= m["validation"]["tolerance"] == TOL
    assert 0 <= m["validation"]["int8"]["shift_error"] <= m["validation"]["int8"]["max_shift_error"] == 0.5
    assert m["created_by"].startswith("cmc-edge ")
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted([*m["files"], "manifest.json"])


def test_bundle_gets_ordinary_permissions(bundle_dir):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert bundle_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in bundle_dir.iterdir())


def test_int8_variant_follows_fp32(bundle_dir):
    b = load_bundle(bundle_dir)
    ids = [int(i) for i in np.random.default_rng(9).integers(0, b.onnx.vocab_size, 20)]
    fp = OnnxDelta(b, "fp32", providers=["CPUExecutionProvider"]).feed_all(ids)
    q = OnnxDelta(b, "int8", providers=["CPUExecutionProvider"]).feed_all(ids)
    assert not np.array_equal(fp, q)                                             # really quantized
    assert np.abs(fp - q).max() < 0.5 and np.corrcoef(fp.ravel(), q.ravel())[0, 1] > 0.99
    assert (q.argmax(-1)[:, None] == np.argsort(-fp, -1)[:, :5]).any(-1).mean() >= 0.95
    assert (bundle_dir / "delta.int8.onnx").stat().st_size < (bundle_dir / "delta.onnx").stat().st_size


def test_tolerance_too_tight_raises_with_the_difference(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ExportValidationError) as info:
        export_bundle(checkpoint, out, tolerance=1e-12, int8=False)
    e = info.value
    assert 1e-12 < e.max_abs_diff < TOL and e.tolerance == 1e-12
    assert "tolerance" in str(e) and e.fix
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validation_catches_a_graph_that_differs(checkpoint, bundle_dir):
    """A model changed after export no longer matches its graph: the check must see it."""
    import torch
    from transformers import LlamaForCausalLM

    from cmc_edge.export.onnx import validate_onnx

    model = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    b = load_bundle(bundle_dir)
    with pytest.raises(ExportValidationError) as info:
        validate_onnx(model, b.model_path("fp32"), b.onnx, b.load_embedding(), tolerance=TOL)
    assert info.value.max_abs_diff > TOL and info.value.tolerance == TOL


def test_interrupted_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import cmc_edge.export.quantize as quantize

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_int8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(checkpoint, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(checkpoint, bundle_dir, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    with pytest.raises(InputError, match="already exists"):
        export_bundle(checkpoint, out, int8=False)
    export_bundle(checkpoint, out, int8=False, overwrite=True)
    assert set(load_bundle(out).models) == {"fp32"}


def _drop(name):
    def edit(ckpt):
        (ckpt / name).unlink()
    return edit


def _meta(**changes):
    def edit(ckpt):
        meta = json.loads((ckpt / "cmc.json").read_text())
        meta.update(changes)
        (ckpt / "cmc.json").write_text(json.dumps(meta))
    return edit


def _drop_key(key):
    def edit(ckpt):
        meta = json.loads((ckpt / "cmc.json").read_text())
        del meta[key]
        (ckpt / "cmc.json").write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize("edit, error, problem", [
    (_drop("model.safetensors"), InputError, "lacks model.safetensors"),
    (_drop("cmc.json"), InputError, "lacks cmc.json"),
    (_meta(format="something-else"), ArtifactError, "format 'something-else'"),
    (_meta(format_version=2), ArtifactError, "version 2"),
    (_drop_key("alpha"), ArtifactError, "lacks 'alpha'"),
    (lambda ckpt: shutil.rmtree(ckpt), InputError, "not a directory"),
])
def test_bad_checkpoints(checkpoint, tmp_path, edit, error, problem):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    edit(ckpt)
    with pytest.raises(error, match=problem) as info:
        read_checkpoint(ckpt)
    assert info.value.fix


def test_int8_check_names_the_shift_error(bundle_dir):
    from cmc_edge.export.quantize import compare_int8

    b = load_bundle(bundle_dir)
    with pytest.raises(ExportValidationError) as info:
        compare_int8(b.model_path("fp32"), b.model_path("int8"), b.onnx, b.load_embedding(), max_shift_error=1e-9)
    assert "changes the delta's shift by up to" in info.value.problem and "--no-int8" in info.value.fix
    assert info.value.max_abs_diff > 1e-9


def random_llama(**overrides):
    """A small HF Llama with every weight random, the RMSNorm gains included (all ones would hide
    a norm applied in the wrong place)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=500.0)
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model


def test_fused_graph_matches_pytorch_with_every_weight_random(tmp_path):
    import onnx

    from cmc_edge.export.onnx import embedding_table, export_onnx, validate_onnx

    model = random_llama(hidden_size=64)                    # head size 16: the GroupQueryAttention form
    for graph in ("fused", "fused-mha", "torch"):
        spec = export_onnx(model, tmp_path / f"{graph}.onnx", graph=graph)
        assert spec.kv_cache == ("shared" if graph == "fused" else "concat")
        res = validate_onnx(model, tmp_path / f"{graph}.onnx", spec, embedding_table(model), tolerance=TOL,
                            chunks=(5, 1, 1, 4, 1, 9))
        assert res["max_abs_diff"] < TOL
    gqa = [n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node]
    mha = [n.op_type for n in onnx.load(tmp_path / "fused-mha.onnx").graph.node]
    traced = onnx.load(tmp_path / "torch.onnx").graph.node
    assert gqa.count("GroupQueryAttention") == 3 and "RotaryEmbedding" not in gqa
    assert mha.count("MultiHeadAttention") == 3 and mha.count("SkipSimplifiedLayerNormalization") == 2 * 3
    assert len(gqa) <= 11 * 3 + 7 < len(mha) <= 15 * 3 + 2 < len(traced) / 3       # what the fused writer is for


def test_shared_cache_graph_runs_the_concat_way_too_and_rolls_back_in_place(tmp_path):
    """The GroupQueryAttention graph gives the same states with one in-place buffer per cache
    tensor (what the runtime binds) as with a growing past, across a rollback and a re-fed chunk."""
    from dataclasses import replace

    from cmc_edge.export.onnx import embedding_table, export_onnx, reference_logits
    from cmc_edge.runtime.onnx_delta import OnnxDelta
    from cmc_edge.runtime.shift import DeltaHead

    model = random_llama(hidden_size=64)
    spec = export_onnx(model, tmp_path / "d.onnx", graph="fused")
    head = DeltaHead(embedding_table(model))
    ids = np.random.default_rng(5).integers(0, spec.vocab_size, 20)
    shared = OnnxDelta.from_file(tmp_path / "d.onnx", spec, head, providers=["CPUExecutionProvider"])
    concat = OnnxDelta.from_file(tmp_path / "d.onnx", replace(spec, kv_cache="concat"), head,
                                 providers=["CPUExecutionProvider"])
    assert shared.shared_cache and not concat.shared_cache
    for d in (shared, concat):
        d.feed(ids[:9])
        d.feed(ids[9:10])
        d.rollback(4)                                       # the next chunk overwrites rows 4..
    got = shared.feed_all(ids[10:16])
    np.testing.assert_allclose(got, concat.feed_all(ids[10:16]), atol=1e-5, rtol=0)
    want = reference_logits(model, np.concatenate([ids[:4], ids[10:16]]))[4:]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert shared.n_past == 10


def test_head_sizes_gqa_cannot_rotate_get_the_multihead_form(tmp_path):
    from cmc_edge.export.onnx import choose_graph

    assert choose_graph(random_llama().config, "auto") == "fused-mha"          # head size 8
    assert choose_graph(random_llama(hidden_size=64).config, "auto") == "fused"


@pytest.mark.parametrize("overrides, reason", [
    ({"num_key_value_heads": 2}, "grouped key/value heads"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"attention_bias": True}, "biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
])
def test_models_the_fused_graph_does_not_cover_export_through_torch(tmp_path, overrides, reason):
    from cmc_edge.export.onnx import choose_graph, embedding_table, export_onnx, validate_onnx

    model = random_llama(**overrides)
    assert choose_graph(model.config, "auto") == "torch"
    with pytest.raises(InputError, match=reason) as e:
        choose_graph(model.config, "fused")
    assert "--graph torch" in e.value.fix
    spec = export_onnx(model, tmp_path / "d.onnx")          # auto: falls back, still exact
    assert validate_onnx(model, tmp_path / "d.onnx", spec, embedding_table(model), tolerance=TOL)["max_abs_diff"] < TOL


def test_recipes_export_fp32_alone_when_int8_moves_the_shift_too_far(checkpoint, tmp_path, monkeypatch):
    """A recipe must not lose its training to an INT8 graph that drifts: the plain export refuses
    (and writes nothing), the recipes' export ships the exact fp32 graph alone."""
    from cmc_edge.export import quantize
    from cmc_edge.export.bundle import FP32_NAME, INT8_NAME
    from cmc_edge.recipes.scaffold import export_checked

    real = quantize.compare_int8
    monkeypatch.setattr(quantize, "compare_int8", lambda *a, **k: real(*a, **{**k, "max_shift_error": 0.0}))
    with pytest.raises(ExportValidationError, match="INT8"):
        export_bundle(checkpoint, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    out = export_checked(checkpoint, tmp_path / "b")
    assert (out / FP32_NAME).is_file() and not (out / INT8_NAME).exists()
    b = load_bundle(out)
    assert set(b.models) == {"fp32"} and b.default_variant == "fp32" and b.model_path() == out / FP32_NAME
