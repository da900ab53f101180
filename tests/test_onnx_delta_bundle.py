"""load_bundle: format, version, member paths and checksums, each failure naming the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from cmc_edge.artifacts import sha256_file
from cmc_edge.errors import ArtifactError, InputError
from cmc_edge.runtime.bundle import OnnxSpec, load_bundle
from tiny_checkpoint import make_tiny_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "bundle", int8=False)


@pytest.fixture
def bundle_copy(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "bundle")


def edit_manifest(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_loads_and_resolves_members(pristine):
    b = load_bundle(pristine)
    assert b.tokenizer_path == pristine.resolve() / "tokenizer.json"
    assert b.model_path("fp32") == pristine.resolve() / "delta.onnx"
    assert isinstance(b.onnx, OnnxSpec) and b.onnx.input_names[:2] == ("inputs_embeds", "position_ids")


def test_the_runtime_runs_int8_where_the_bundle_has_it_and_fp32_otherwise(pristine, tmp_path, tiny_gguf):
    from cmc_edge.runtime.engine import Delta
    from cmc_edge.runtime.target import TargetLLM

    with_int8 = make_tiny_bundle(tmp_path / "with", int8=True)
    assert load_bundle(pristine).default_variant == "fp32" and load_bundle(with_int8).default_variant == "int8"
    assert load_bundle(with_int8).model_path() == with_int8.resolve() / "delta.int8.onnx"
    target = TargetLLM(tiny_gguf, n_ctx=64)
    assert Delta(with_int8, target).variant == "int8"
    assert Delta(with_int8, target, variant="fp32").variant == "fp32"
    assert Delta(pristine, target).variant == "fp32"
    with pytest.raises(InputError, match="no 'int8' model"):
        Delta(pristine, target, variant="int8")


def corrupt_file(root):
    with open(root / "delta.onnx", "ab") as fh:
        fh.write(b"\0")


def escape(root):
    (root.parent / "evil.json").write_text("{}")
    edit_manifest(root, lambda m: m["files"].update({"../evil.json": sha256_file(root.parent / "evil.json")}))


def absolute(root):
    edit_manifest(root, lambda m: m["files"].update({"/etc/hostname": "0" * 64}))


def version(v):
    return lambda root: edit_manifest(root, lambda m: m.update(format_version=v))


def tokenizer_outside(root):
    edit_manifest(root, lambda m: m.update(tokenizer="../tokenizer.json"))


@pytest.mark.parametrize("damage, error, problem, fix", [
    (corrupt_file, ArtifactError, "delta.onnx fails its checksum", "re-export"),
    (escape, ArtifactError, "points outside", "inside their own directory"),
    (absolute, ArtifactError, "not a relative path", "inside their own directory"),
    (lambda r: (r / "manifest.json").unlink(), ArtifactError, "has no manifest.json", "cmc-edge export"),
    (lambda r: (r / "tokenizer.json").unlink(), ArtifactError, "tokenizer.json is missing", "copy the whole"),
    (version(3), ArtifactError, "format version 3", "upgrade cmc-edge"),
    (version(1), ArtifactError, "format version 1, no longer supported", "re-export"),
    (version("1"), ArtifactError, "no valid format_version", "re-export"),
    (lambda r: edit_manifest(r, lambda m: m.update(format="cmc-edge-checkpoint")), ArtifactError,
     "format 'cmc-edge-checkpoint'", "export it first"),
    (tokenizer_outside, ArtifactError, "not among its checksummed files", "re-export"),
    (lambda r: edit_manifest(r, lambda m: m.pop("embedding")), ArtifactError, "names the embedding None",
     "re-export"),
    (lambda r: edit_manifest(r, lambda m: m.update(default_alpha=None)), ArtifactError, "default_alpha",
     "re-export"),
    (lambda r: edit_manifest(r, lambda m: m["onnx"].update(num_layers=3)), ArtifactError, "3 layers need",
     "re-export"),
    (lambda r: (r / "manifest.json").write_text("{not json"), ArtifactError, "not valid JSON", "corrupt"),
    (lambda r: shutil.rmtree(r), InputError, "not a directory", "cmc-edge export"),
])
def test_damaged_bundles(bundle_copy, damage, error, problem, fix):
    damage(bundle_copy)
    with pytest.raises(error) as info:
        load_bundle(bundle_copy)
    assert problem in info.value.problem and fix in info.value.fix


def test_a_checkpoint_is_not_a_bundle(pristine):
    ckpt = pristine.with_name(pristine.name + ".ckpt")
    with pytest.raises(ArtifactError, match="no manifest.json") as info:
        load_bundle(ckpt)
    assert "training checkpoint" in info.value.fix


def test_verify_false_skips_checksums_only(bundle_copy):
    corrupt_file(bundle_copy)
    assert load_bundle(bundle_copy, verify=False).models["fp32"].is_file()
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_bundle(bundle_copy, verify=False)
