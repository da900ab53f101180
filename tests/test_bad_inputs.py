"""Bad inputs across the pipeline, one table. Every case must name the problem and the fix, and must
write nothing and lose nothing: the working directory is byte-for-byte what it was before (no output,
no temporary file, no pre-existing file changed or removed).

A case's setup prepares files in ``env.tmp`` and returns either the ``cmc-edge`` argv (run through
``cli.main``, which must exit 2 and print ``error: PROBLEM. Fix: FIX``, no traceback) or a callable
that must raise :class:`~cmc_edge.errors.CmcError`. The table gives a substring of PROBLEM and one of FIX.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cmc_edge.artifacts import atomic_dir, sha256_file
from cmc_edge.cli import main
from cmc_edge.errors import CmcError

pytest.importorskip("torch")  # the tiny bundle is exported with torch


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny delta bundle and, beside it, the checkpoint it was exported from (never modified)."""
    from tiny_checkpoint import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("pristine") / "bundle")
    return bundle, bundle.with_name("bundle.ckpt")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """tokenizer.json of another vocabulary, larger than the tiny delta's (350 tokens against 300)."""
    from tiny_checkpoint import make_tiny_tokenizer

    out = tmp_path_factory.mktemp("other-tok")
    make_tiny_tokenizer(350).save_pretrained(out)
    return out / "tokenizer.json"


@dataclass
class Env:
    tmp: Path
    gguf: Path
    pristine_bundle: Path
    pristine_ckpt: Path
    other_tokenizer: Path
    monkeypatch: pytest.MonkeyPatch

    def bundle(self) -> Path:
        return shutil.copytree(self.pristine_bundle, self.tmp / "bundle")

    def ckpt(self) -> Path:
        return shutil.copytree(self.pristine_ckpt, self.tmp / "ckpt")

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def gen(self, *extra: str, prompt: str = "hi", delta: Path | None = None) -> list[str]:
        """``cmc-edge generate`` on the tiny GGUF (short and greedy)."""
        argv = ["generate", prompt, "--model", str(self.gguf), "--n-ctx", "256", "--max-tokens", "4", "-t", "0"]
        return argv + (["--delta", str(delta)] if delta is not None else ["--no-delta"]) + list(extra)

    def train(self, *extra: str) -> list[str]:
        return ["train", "--template", str(self.gguf), "--size", "tiny", "--out", str(self.tmp / "ckpt-out"),
                *extra]


def rewrite_manifest(root: Path, *, vocab: bool = False, **changes) -> None:
    """Make the manifest consistent with edited files again: fresh checksums (and vocabulary hash)."""
    from cmc_edge.tokenmap import read_tokenizer_json

    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    m["files"] = {n: sha256_file(root / n) for n in m["files"]}
    if vocab:
        m["delta_vocab_hash"] = read_tokenizer_json(root / "tokenizer.json").hash
    (root / "manifest.json").write_text(json.dumps(m))


def no_space(path="artifact"):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


# ----------------------------------------------------------------------------- model files

def model(name: str, content: bytes | None = None):
    """``generate`` on ``env.tmp/name`` (written first when ``content`` is given; "" = the directory)."""
    def setup(env):
        path = env.file(name, content) if content is not None else env.tmp / name
        return ["generate", "hi", "--model", str(path), "--no-delta"]
    return setup


def model_truncated(env):
    raw = env.gguf.read_bytes()
    return model("half.gguf", raw[: len(raw) // 2])(env)


def map_model_header_cut(env):
    cut = env.file("cut.gguf", env.gguf.read_bytes()[:200])
    return ["map", "--model", str(cut), "--delta", str(env.bundle())]


def model_is_onnx(env):
    b = env.bundle()
    return ["generate", "hi", "--model", str(b / "delta.onnx"), "--no-delta"]


# ----------------------------------------------------------------------------- bundles and ONNX graphs

def onnx_corrupted(env):
    b = env.bundle()
    data = bytearray((b / "delta.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "delta.onnx").write_bytes(bytes(data))
    return ["inspect", str(b)]


def onnx_foreign(env):
    import onnx
    from onnx import TensorProto, helper

    b = env.bundle()
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", io[:1], io[1:])
    onnx.save(helper.make_model(graph), b / "delta.int8.onnx")      # the graph generate runs by default
    rewrite_manifest(b)                          # checksums fine: only the graph's interface can tell
    return env.gen(delta=b)


def onnx_not_protobuf(env):
    b = env.bundle()
    (b / "delta.onnx").write_bytes(b"\x08\x07 not a protobuf " * 64)
    rewrite_manifest(b)
    return env.gen("--fp32", delta=b)


def bundle_without_manifest(env):
    b = env.bundle()
    (b / "manifest.json").unlink()
    return env.gen(delta=b)


def manifest_truncated(env):
    b = env.bundle()
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 2])
    return ["inspect", str(b)]


def member_missing(env):
    b = env.bundle()
    (b / "tokenizer_config.json").unlink()
    return ["inspect", str(b)]


def member_escapes(env):
    b = env.bundle()
    secret = env.file("secret.txt", "not part of any bundle")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../secret.txt"] = sha256_file(secret)
    (b / "manifest.json").write_text(json.dumps(m))
    return env.gen(delta=b)


def bundle_from_the_future(env):
    b = env.bundle()
    rewrite_manifest(b, format_version=3)
    return ["inspect", str(b)]


def bundle_with_negative_floor(env):
    b = env.bundle()
    rewrite_manifest(b, shift_floor=-0.5)
    return env.gen(delta=b)


def bundle_with_bad_model_alpha(env):
    b = env.bundle()
    rewrite_manifest(b, model_alphas={"0" * 64: {"alpha": -1.0, "model": "x.gguf"}})
    return env.gen(delta=b)


def bundle_of_format_1(env):
    """A bundle from before the output layer moved out of the graph."""
    b = env.bundle()
    rewrite_manifest(b, format_version=1)
    return env.gen(delta=b)


def embedding_wrong_shape(env):
    b = env.bundle()
    np.save(b / "embedding.npy", np.zeros((10, 4), np.float32))
    rewrite_manifest(b)
    return env.gen(delta=b)


def head_groups_corrupt(env):
    b = env.bundle()
    (b / "head_groups.npz").write_bytes(b"PK\x03\x04 not really a zip")
    rewrite_manifest(b)
    return env.gen(delta=b)


def embedding_is_a_pickle(env):
    """An object array in the .npy: loading it would unpickle; it is refused instead."""
    b = env.bundle()
    np.save(b / "embedding.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    rewrite_manifest(b)
    return env.gen(delta=b)


def checkpoint_as_bundle(env):
    return env.gen(delta=env.ckpt())


def tokenizer_swapped(env):
    b = env.bundle()
    shutil.copyfile(env.other_tokenizer, b / "tokenizer.json")
    rewrite_manifest(b)                          # checksums match; the vocabulary hash does not
    return env.gen(delta=b)


def tokenizer_of_another_vocab(env):
    """A consistent-looking bundle (checksums and vocabulary hash rewritten) whose graph was trained
    for a smaller vocabulary than its tokenizer's."""
    b = env.bundle()
    shutil.copyfile(env.other_tokenizer, b / "tokenizer.json")
    rewrite_manifest(b, vocab=True)
    return env.gen(delta=b)


def int8_missing(env):
    b = env.bundle()
    (b / "delta.int8.onnx").unlink()
    m = json.loads((b / "manifest.json").read_text())
    del m["models"]["int8"], m["files"]["delta.int8.onnx"]
    (b / "manifest.json").write_text(json.dumps(m))
    return env.gen("--int8", delta=b)


# ----------------------------------------------------------------------------- export

def export_over_existing(env):
    return ["export", str(env.pristine_ckpt), "--out", str(env.bundle())]


def export_a_bundle(env):
    return ["export", str(env.bundle()), "--out", str(env.tmp / "out")]


def export_mismatched_tokenizer(env):
    ckpt = env.ckpt()
    shutil.copyfile(env.other_tokenizer, ckpt / "tokenizer.json")
    return ["export", str(ckpt), "--out", str(env.tmp / "out")]


def export_tolerance_zero(env):
    return ["export", str(env.pristine_ckpt), "--out", str(env.tmp / "out"), "--tolerance", "0"]


def export_fused_not_covered(env):
    """--graph fused for a delta the fused writer does not cover (another activation)."""
    ckpt = env.ckpt()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ["export", str(ckpt), "--out", str(env.tmp / "out"), "--graph", "fused"]


def export_disk_full(env):
    import cmc_edge.export.onnx as export_onnx

    def full(model, path, **_kw):
        Path(path).write_bytes(b"half an ONNX graph")
        raise no_space(path)

    env.monkeypatch.setattr(export_onnx, "export_onnx", full)
    return ["export", str(env.ckpt()), "--out", str(env.tmp / "out")]


def export_no_space_for_temp_dir(env):
    """The disk is already full: even the temporary directory cannot be created."""
    import cmc_edge.artifacts as artifacts

    def mkdtemp(**_kw):
        raise no_space(env.tmp / "out")

    env.monkeypatch.setattr(artifacts.tempfile, "mkdtemp", mkdtemp)
    return ["export", str(env.ckpt()), "--out", str(env.tmp / "out")]


def map_out_read_only(env):
    """The output directory is on a read-only file system (the temporary file cannot be created)."""
    import cmc_edge.artifacts as artifacts

    def mkstemp(**_kw):
        raise OSError(errno.EROFS, "Read-only file system", str(env.tmp))

    env.monkeypatch.setattr(artifacts.tempfile, "mkstemp", mkstemp)
    return ["map", "--model", str(env.gguf), "--delta", str(env.bundle()), "--out", str(env.tmp / "map.npz")]


def overwrite_disk_full(env):
    """Replacing an existing bundle fails at the last rename: the old bundle must still be there."""
    import cmc_edge.artifacts as artifacts

    out = env.bundle()
    real = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise no_space(dst)
        return real(src, dst)

    env.monkeypatch.setattr(artifacts.os, "replace", replace)

    def act():
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
    return act


# ----------------------------------------------------------------------------- token maps

def _map_files(env):
    from cmc_edge.tokenmap import build_token_map, read_gguf_vocab, read_tokenizer_json, save_token_map

    target, delta = read_gguf_vocab(env.gguf), read_tokenizer_json(env.pristine_bundle / "tokenizer.json")
    return save_token_map(build_token_map(target, delta), env.tmp / "map.npz"), target, delta


def map_for_another_model(env):
    from cmc_edge.tokenmap import load_token_map

    path, _, delta = _map_files(env)
    other_target = delta                  # any other vocabulary: here the delta's own
    return lambda: load_token_map(path, target_hash=other_target.hash, delta_hash=delta.hash)


def map_file_truncated(env):
    from cmc_edge.tokenmap import load_token_map

    path, target, delta = _map_files(env)
    path.write_bytes(path.read_bytes()[:100])
    return lambda: load_token_map(path, target_hash=target.hash, delta_hash=delta.hash)


def map_out_exists(env):
    keep = env.file("keep.npz", b"someone's file")
    return ["map", "--model", str(env.gguf), "--delta", str(env.bundle()), "--out", str(keep)]


def failing_savez(monkeypatch, under: Path, exc: BaseException) -> None:
    """np.savez fails with ``exc`` half-way through writing a file under ``under`` (the cache still works)."""
    import numpy as np

    real = np.savez

    def savez(fh, **arrays):
        if not str(fh.name).startswith(str(under)):
            return real(fh, **arrays)
        fh.write(b"PK\x03\x04 half a map")
        raise exc

    monkeypatch.setattr(np, "savez", savez)


def map_out_disk_full(env):
    failing_savez(env.monkeypatch, env.tmp, no_space())
    return ["map", "--model", str(env.gguf), "--delta", str(env.bundle()), "--out", str(env.tmp / "map.npz")]


def map_sample_text_not_utf8(env):
    sample = env.file("sample.txt", b"caf\xe9 au lait")
    return ["map", "--model", str(env.gguf), "--delta", str(env.bundle()), "--stats", "--sample-text", str(sample),
            "--out", str(env.tmp / "map.npz")]


# ----------------------------------------------------------------------------- datasets

GOOD = '{"prompt": "What is the capital of France?", "response": "Paris."}\n'


def data(content: bytes | str):
    return lambda env: env.train("--data", str(env.file("data.jsonl", content)))


def train_out_exists(env):
    (env.tmp / "ckpt-out").mkdir()
    env.file("ckpt-out/model.safetensors", b"earlier run")
    return env.train("--data", str(env.file("data.jsonl", GOOD)))


# ----------------------------------------------------------------------------- the table

def generate(*extra: str, prompt: str = "hi", delta: bool = False):
    """``generate`` on the tiny GGUF with ``extra`` options (and a fresh copy of the tiny bundle)."""
    return lambda env: env.gen(*extra, prompt=prompt, delta=env.bundle() if delta else None)


def case(id: str, setup, problem: str, fix: str):
    """``problem``: a substring of the error message; ``fix``: a substring of its fix."""
    return pytest.param(setup, problem, fix, id=id)


CASES = [
    # model files
    case("model-missing", model("nope.gguf"), "not found", ".gguf file"),
    case("model-empty-file", model("empty.gguf", b""), "is not a GGUF file", "llama.cpp .gguf model"),
    case("model-is-an-onnx-file", model_is_onnx, "is not a GGUF file", "llama.cpp .gguf model"),
    case("model-truncated", model_truncated, "could not load", "complete GGUF model"),
    case("model-is-a-dir", model(""), "is a directory", ".gguf file in it"),
    case("map-model-header-truncated", map_model_header_cut, "could not read the vocabulary", "complete GGUF model"),
    # bundles and ONNX graphs
    case("onnx-corrupted", onnx_corrupted, "fails its checksum", "re-export"),
    case("onnx-foreign-graph", onnx_foreign, "not the ones its manifest declares", "re-export"),
    case("onnx-not-protobuf", onnx_not_protobuf, "onnxruntime cannot load", "re-export"),
    case("bundle-no-manifest", bundle_without_manifest, "has no manifest.json", "cmc-edge export"),
    case("bundle-manifest-truncated", manifest_truncated, "not valid JSON", "re-create"),
    case("bundle-file-missing", member_missing, "is missing from", "copy the whole bundle"),
    case("bundle-path-escapes", member_escapes, "points outside", "inside their own directory"),
    case("bundle-newer-format", bundle_from_the_future, "format version 3", "upgrade cmc-edge"),
    case("bundle-negative-floor", bundle_with_negative_floor, "shift_floor", "set it to 0"),
    case("bundle-bad-model-alpha", bundle_with_bad_model_alpha, "malformed model_alphas", "remove model_alphas"),
    case("bundle-old-format", bundle_of_format_1, "format version 1, no longer supported", "cmc-edge export"),
    case("embedding-wrong-shape", embedding_wrong_shape, "the manifest declares float32 (300, 32)", "re-export"),
    case("head-groups-corrupt", head_groups_corrupt, "cannot read the delta's head groups", "re-export"),
    case("embedding-is-a-pickle", embedding_is_a_pickle, "cannot read the delta's embedding", "re-export"),
    case("checkpoint-as-bundle", checkpoint_as_bundle, "not a delta bundle", "training checkpoint; export it"),
    case("delta-vocab-hash-mismatch", tokenizer_swapped, "does not match its manifest's vocabulary hash", "re-export"),
    case("delta-other-template-vocab", tokenizer_of_another_vocab, "trained for another vocabulary",
         "training checkpoint"),
    case("int8-not-exported", int8_missing, "no 'int8' model", "--no-int8"),
    # export
    case("export-over-existing", export_over_existing, "already exists", "--overwrite"),
    case("export-a-bundle", export_a_bundle, "looks like an exported bundle", "cmc-edge train"),
    case("export-other-template-tokenizer", export_mismatched_tokenizer, "the tokenizer has 350 tokens",
         "cmc-edge train"),
    case("export-tolerance-zero", export_tolerance_zero, "tolerance must be positive", "--tolerance"),
    case("export-fused-graph-not-covering-the-delta", export_fused_not_covered, "activation 'gelu'",
         "--graph torch"),
    case("export-disk-full", export_disk_full, "disk is full", "free space"),
    case("export-disk-full-before-any-data", export_no_space_for_temp_dir, "disk is full", "free space"),
    case("overwrite-disk-full-keeps-old", overwrite_disk_full, "disk is full", "free space"),
    # token maps
    case("map-for-another-model", map_for_another_model, "stale or foreign", "cmc-edge map"),
    case("map-file-truncated", map_file_truncated, "not a readable token map", "cmc-edge map"),
    case("map-out-exists", map_out_exists, "already exists", "--overwrite"),
    case("map-disk-full", map_out_disk_full, "disk is full", "free space"),
    case("map-out-read-only", map_out_read_only, "Read-only file system", "directory you can write to"),
    case("map-sample-text-not-utf8", map_sample_text_not_utf8, "not valid UTF-8", "UTF-8"),
    # datasets
    case("data-missing", lambda env: env.train("--data", str(env.tmp / "nope.jsonl")), "not found", ".jsonl"),
    case("data-empty", data(""), "has no records", "at least one JSON line"),
    case("data-blank-lines", data("\n  \n\n"), "has no records", "at least one JSON line"),
    case("data-bad-json-line-3", data(GOOD + GOOD + '{"prompt": "cut off\n'), "data.jsonl:3: invalid JSON",
         "JSON object"),
    case("data-record-incomplete-line-2", data(GOOD + '{"prompt": "no response"}\n'), "data.jsonl:2:",
         '"prompt"/"response"'),
    case("data-invalid-utf8", data(GOOD.encode() + b'{"prompt": "caf\xe9", "response": "ok"}\n'), "not valid UTF-8",
         "UTF-8"),
    case("train-alpha-inf", lambda env: data(GOOD)(env) + ["--alpha", "inf"], "alpha must be a positive finite",
         "--alpha"),
    case("train-out-exists", train_out_exists, "already exists", "--overwrite"),
    # prompts, alpha, chat template, sampling, server options
    case("prompt-longer-than-context", generate(prompt="word " * 600), "the context holds", "--n-ctx"),
    case("prompt-invalid-utf8-bytes", generate(prompt="caf\udce9"), "not valid UTF-8", "UTF-8"),
    case("alpha-nan", generate("--alpha", "nan", delta=True), "alpha must be a finite number", "--alpha"),
    case("alpha-count-mismatch", generate("--alpha", "1", "--alpha", "2", delta=True), "--alpha values for 1 --delta",
         "one --alpha per --delta"),
    case("chat-template-unknown-name", generate("--chat-template", "chatml"), "is not a Jinja template", "Jinja text"),
    case("chat-template-broken", generate("--chat-template", "{{ messages | no_such_filter }}"),
         "chat template failed to render", "valid Jinja"),
    case("max-tokens-zero", generate("--max-tokens", "0"), "max_tokens must be a positive", "--max-tokens"),
    case("serve-timeout-zero", lambda env: ["serve", "--model", str(env.gguf), "--request-timeout", "0"],
         "request timeout must be a positive", "--request-timeout"),
]


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the SHA-256 of its content ("dir" for directories)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_the_table_is_large_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("setup, problem, fix_names", CASES)
def test_bad_input(setup, problem, fix_names, tiny_gguf, pristine, other_tokenizer, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, tiny_gguf, *pristine, other_tokenizer, monkeypatch)
    action = setup(env)
    before = tree(tmp_path)
    capsys.readouterr()
    if callable(action):
        with pytest.raises(CmcError) as info:
            action()
        message, fix = info.value.problem, info.value.fix
    else:
        code = main(action)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "error: " in err and "Traceback" not in err
        message = err[err.index("error: ") + len("error: "):]
        message, _, fix = message.rpartition(". Fix: ")
        assert not message.endswith("."), f"doubled full stop in {err!r}"
    assert problem.lower() in message.lower()
    assert fix_names in (fix or ""), f"the fix for {message!r} is {fix!r}"
    assert tree(tmp_path) == before           # nothing written, nothing lost, no temporary files


def test_interrupted_map_leaves_nothing(tiny_gguf, pristine, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the token map is being written: exit 130, no map, no temporary file."""
    failing_savez(monkeypatch, tmp_path, KeyboardInterrupt())
    out = tmp_path / "out"
    out.mkdir()
    assert main(["map", "--model", str(tiny_gguf), "--delta", str(pristine[0]), "--out", str(out / "m.npz")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(out.iterdir()) == []
