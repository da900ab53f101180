"""Load and verify a delta bundle: the self-describing directory written by ``cmc-edge export``.

A bundle is ``manifest.json`` plus the files it names, each with its SHA-256::

    bundle/
      manifest.json        format, version, combination rule, alpha (and per model), prompt format, vocab hash,
                           graph I/O, checksums
      delta.onnx           fp32 graph with KV cache (embeddings in, final hidden state out)
      delta.int8.onnx      weights-only INT8 (optional)
      embedding.npy        the tied embedding / output layer, float32 (V, d), read without pickle
      head_groups.npz      a k-means grouping of its rows (labels, centroids): the runtime's shift bounds
      tokenizer.json ...   the delta's tokenizer

Loading checks the format and version, that every file named stays inside the bundle directory,
and (``verify=True``) every checksum; each failure says what is wrong and how to fix it.
No torch here: this module runs on the edge.

>>> spec = OnnxSpec.for_layers(num_layers=1, num_kv_heads=2, head_dim=8, vocab_size=100, max_positions=64,
...                            hidden_size=16)
>>> spec.input_names
('inputs_embeds', 'position_ids', 'past_key_0', 'past_value_0')
>>> spec.output_names
('hidden', 'present_key_0', 'present_value_0')
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cmc_edge.artifacts import read_json, safe_member, sha256_file
from cmc_edge.errors import ArtifactError, InputError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "cmc-edge-bundle"
# 2: the graph maps embeddings to the final hidden state; the tied embedding is embedding.npy.
BUNDLE_VERSION = 2
MANIFEST = "manifest.json"
COMBINATION = "log_softmax(template_logits) + alpha * delta_logits"
Variant = Literal["fp32", "int8"]

_REEXPORT = "re-export it with `cmc-edge export CHECKPOINT --out DIR`"


@dataclass(frozen=True)
class OnnxSpec:
    """The delta graph's interface (batch 1, no padding; S new tokens on top of P cached ones).

    inputs ``inputs_embeds`` float32 (1, S, d), ``position_ids`` int64 (1, S),
    ``past_{key,value}_i`` float32 (1, H, P, Dh); outputs ``hidden`` float32 (1, S, d),
    ``present_{key,value}_i`` float32 (1, H, P+S, Dh). The output layer (tied embedding, (V, d))
    is applied by the runtime.

    ``kv_cache``: "concat" (the past grows by S each step, as above) or "shared": the graph may
    also be run with one buffer per cache tensor of ``max_positions`` slots, bound as both the
    past input and the present output; it then writes the S new rows in place at positions
    ``position_ids`` and attends to the first ``position_ids[-1] + 1`` rows (the fused
    GroupQueryAttention graph). A "shared" graph also runs the "concat" way.
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    hidden_size: int
    kv_cache: Literal["concat", "shared"] = "concat"

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_positions", "hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArtifactError(f"the bundle's onnx.{name} must be a positive integer, got {v!r}", fix=_REEXPORT)
        if self.kv_cache not in ("concat", "shared"):
            raise ArtifactError(f"the bundle's onnx.kv_cache must be 'concat' or 'shared', got {self.kv_cache!r}",
                                fix="upgrade cmc-edge, or " + _REEXPORT)
        n = 2 + 2 * self.num_layers
        if len(self.input_names) != n or len(self.output_names) != n - 1:
            raise ArtifactError(
                f"the bundle's graph names {len(self.input_names)} inputs and {len(self.output_names)} outputs, "
                f"but {self.num_layers} layers need {n} and {n - 1}", fix=_REEXPORT)

    @classmethod
    def for_layers(cls, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                   max_positions: int, hidden_size: int) -> "OnnxSpec":
        """The canonical names for ``num_layers`` layers (what the exporter writes)."""
        kv = [f"{k}_{i}" for i in range(num_layers) for k in ("key", "value")]
        return cls(input_names=("inputs_embeds", "position_ids", *(f"past_{x}" for x in kv)),
                   output_names=("hidden", *(f"present_{x}" for x in kv)),
                   num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   vocab_size=vocab_size, max_positions=max_positions, hidden_size=hidden_size)

    @property
    def past_names(self) -> tuple[str, ...]:
        return self.input_names[2:]

    @property
    def present_names(self) -> tuple[str, ...]:
        return self.output_names[1:]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_names"], d["output_names"] = list(self.input_names), list(self.output_names)
        return d

    @classmethod
    def from_dict(cls, d: object) -> "OnnxSpec":
        keys = ("input_names", "output_names", "num_layers", "num_kv_heads", "head_dim", "vocab_size",
                "max_positions", "hidden_size")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            raise ArtifactError(f"the bundle manifest's 'onnx' entry must be an object with {', '.join(keys)}",
                                fix=_REEXPORT)
        if not all(isinstance(n, str) for n in [*d["input_names"], *d["output_names"]]):
            raise ArtifactError("the bundle's graph input/output names must be strings", fix=_REEXPORT)
        return cls(input_names=tuple(d["input_names"]), output_names=tuple(d["output_names"]),
                   kv_cache=d.get("kv_cache", "concat"), **{k: d[k] for k in keys[2:]})


@dataclass(frozen=True)
class Bundle:
    """A verified delta bundle. Paths are absolute and inside ``root``."""

    root: Path
    manifest: dict
    files: dict[str, Path]               # every checksummed file, by its name in the manifest
    models: dict[str, Path]              # variant ("fp32", "int8") -> ONNX file
    tokenizer_path: Path
    embedding_path: Path
    groups_path: Path
    onnx: OnnxSpec
    prompt_format: dict
    default_alpha: float
    delta_vocab_hash: str
    shift_floor: float = 0.0             # shifts smaller than this (nats, after alpha) are dropped; 0: none
    model_alphas: dict = field(default_factory=dict)   # model file SHA-256 -> the alpha chosen for that model

    def alpha_for(self, digest: str) -> tuple[float, str]:
        """The strength to run on the model whose file has SHA-256 ``digest``, and where it comes
        from: the one a recipe chose for that model, else ``default_alpha``."""
        if digest in self.model_alphas:
            return self.model_alphas[digest], "chosen for this model"
        return self.default_alpha, "the bundle's default"

    @property
    def max_positions(self) -> int:
        return self.onnx.max_positions

    @property
    def default_variant(self) -> Variant:
        """The graph the runtime runs unless told otherwise: INT8 where the bundle has one (the
        exporter only writes it after checking it against fp32), else fp32."""
        return "int8" if "int8" in self.models else "fp32"

    def model_path(self, variant: Variant | None = None) -> Path:
        variant = variant or self.default_variant
        if variant not in self.models:
            have = ", ".join(sorted(self.models)) or "none"
            fix = ("re-export without --no-int8, or use the fp32 variant" if variant == "int8"
                   else "use one of the variants it has")
            raise InputError(f"the bundle at {self.root} has no {variant!r} model (it has: {have})", fix=fix)
        return self.models[variant]

    def load_embedding(self):
        """The tied embedding / output layer as a float32 array (V, d); no pickle."""
        import numpy as np

        try:
            E = np.load(self.embedding_path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"cannot read the delta's embedding {self.embedding_path}: {exc}", fix=_REEXPORT) from exc
        want = (self.onnx.vocab_size, self.onnx.hidden_size)
        if E.dtype != np.float32 or E.shape != want:
            raise ArtifactError(f"the delta's embedding {self.embedding_path} is {E.dtype} {E.shape}, "
                                f"the manifest declares float32 {want}", fix=_REEXPORT)
        return E

    def load_groups(self):
        """(labels (V,), centroids (B, d)) from ``head_groups.npz``; no pickle."""
        import zipfile

        import numpy as np

        try:
            with np.load(self.groups_path, allow_pickle=False) as z:
                labels, centroids = z["labels"], z["centroids"]
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"cannot read the delta's head groups {self.groups_path}: {exc}", fix=_REEXPORT) from exc
        if labels.shape != (self.onnx.vocab_size,) or centroids.ndim != 2 or centroids.shape[1] != self.onnx.hidden_size:
            raise ArtifactError(f"the delta's head groups {self.groups_path} do not fit its "
                                f"{self.onnx.vocab_size} x {self.onnx.hidden_size} embedding", fix=_REEXPORT)
        return labels, centroids


def _check_format(manifest: dict, where: Path) -> None:
    fmt, ver = manifest.get("format"), manifest.get("format_version")
    if fmt != BUNDLE_FORMAT:
        fix = ("this is a training checkpoint; export it first with `cmc-edge export`"
               if fmt == "cmc-edge-checkpoint" else "pass a directory written by `cmc-edge export`")
        raise ArtifactError(f"{where} has format {fmt!r}, not {BUNDLE_FORMAT!r}", fix=fix)
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise ArtifactError(f"{where} has no valid format_version ({ver!r})", fix=_REEXPORT)
    if ver > BUNDLE_VERSION:
        raise ArtifactError(f"{where} is bundle format version {ver}; this cmc-edge reads version {BUNDLE_VERSION}",
                            fix="upgrade cmc-edge (`pip install -U cmc-edge`)")
    if ver < BUNDLE_VERSION:
        raise ArtifactError(f"{where} is bundle format version {ver}, no longer supported "
                            f"(this cmc-edge reads version {BUNDLE_VERSION})", fix=_REEXPORT)


def _member(root: Path, name: object, files: dict[str, Path], what: str) -> Path:
    if not isinstance(name, str) or name not in files:
        raise ArtifactError(f"the bundle manifest names {what} {name!r}, which is not among its checksummed files",
                            fix=_REEXPORT)
    return files[name]


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read ``path/manifest.json``, check format, member paths and (``verify``) every SHA-256."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"no delta bundle at {root} (not a directory)",
                         fix="pass the directory written by `cmc-edge export`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        fix = ("this is a training checkpoint; export it with `cmc-edge export` first"
               if (root / "cmc.json").is_file() else
               "pass the directory written by `cmc-edge export`, or " + _REEXPORT + " (an interrupted copy?)")
        raise ArtifactError(f"{root} has no {MANIFEST}, so it is not a delta bundle", fix=fix)
    manifest = read_json(mpath, "bundle manifest")
    _check_format(manifest, mpath)

    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise ArtifactError(f"{mpath} lists no files", fix=_REEXPORT)
    files: dict[str, Path] = {}
    for name, digest in listed.items():
        p = safe_member(root, name)
        if not p.is_file():
            raise ArtifactError(f"the bundle file {name} is missing from {root}",
                                fix="copy the whole bundle directory, or " + _REEXPORT)
        if verify:
            actual = sha256_file(p)
            if actual != digest:
                raise ArtifactError(f"the bundle file {name} fails its checksum (sha256 {actual[:12]}..., "
                                    f"manifest says {str(digest)[:12]}...): it is corrupt or was modified",
                                    fix="copy the bundle again, or " + _REEXPORT)
        files[name] = p

    models_entry = manifest.get("models")
    if not isinstance(models_entry, dict) or "fp32" not in models_entry:
        raise ArtifactError(f"{mpath} names no fp32 model", fix=_REEXPORT)
    models = {v: _member(root, n, files, f"the {v} model") for v, n in models_entry.items()}
    tokenizer_path = _member(root, manifest.get("tokenizer"), files, "the tokenizer")
    embedding_path = _member(root, manifest.get("embedding"), files, "the embedding")
    groups_path = _member(root, manifest.get("head_groups"), files, "the head groups")

    alpha = manifest.get("default_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ArtifactError(f"{mpath} has no finite default_alpha ({alpha!r})", fix=_REEXPORT)
    vocab_hash = manifest.get("delta_vocab_hash")
    if not isinstance(vocab_hash, str) or not vocab_hash:
        raise ArtifactError(f"{mpath} has no delta_vocab_hash", fix=_REEXPORT)
    floor = manifest.get("shift_floor", 0.0)
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not math.isfinite(floor) or floor < 0:
        raise ArtifactError(f"{mpath} has a shift_floor that is not a finite number >= 0 ({floor!r})",
                            fix="set it to 0 (no floor) or the value its recipe chose, or " + _REEXPORT)
    model_alphas, chosen = {}, manifest.get("model_alphas") or {}
    if not isinstance(chosen, dict):
        raise ArtifactError(f"{mpath} has a model_alphas that is not a mapping ({chosen!r})",
                            fix="remove it (the bundle then runs at default_alpha), or " + _REEXPORT)
    for digest, entry in chosen.items():
        a = entry.get("alpha") if isinstance(entry, dict) else None
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a <= 0:
            raise ArtifactError(f"{mpath} has a malformed model_alphas entry for {str(digest)[:12]}... ({entry!r})",
                                fix="remove model_alphas (the bundle then runs at default_alpha), or " + _REEXPORT)
        model_alphas[str(digest)] = float(a)
    prompt_format = manifest.get("prompt_format") or {}
    if not isinstance(prompt_format, dict):
        raise ArtifactError(f"{mpath} has a malformed prompt_format", fix=_REEXPORT)

    bundle = Bundle(root=root.resolve(), manifest=manifest, files=files, models=models,
                    tokenizer_path=tokenizer_path, embedding_path=embedding_path, groups_path=groups_path,
                    onnx=OnnxSpec.from_dict(manifest.get("onnx")),
                    prompt_format=prompt_format, default_alpha=float(alpha), delta_vocab_hash=vocab_hash,
                    shift_floor=float(floor), model_alphas=model_alphas)
    log.debug("loaded delta bundle %s (%s)", root, ", ".join(sorted(models)))
    return bundle
