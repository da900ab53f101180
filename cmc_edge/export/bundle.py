"""Checkpoint -> delta bundle: export, validate, quantize, describe, checksum; all or nothing.

The bundle is built in a temporary directory beside ``out_dir`` and renamed into place only
after every check passed and the finished bundle loads and verifies with the runtime's own
:func:`cmc_edge.runtime.bundle.load_bundle`; an interrupted or failed export leaves nothing.

>>> export_bundle("ckpt/", "bundle/")                    # doctest: +SKIP
PosixPath('bundle')
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cmc_edge.artifacts import atomic_dir, read_json, sha256_file, write_json
from cmc_edge.errors import ArtifactError, InputError
from cmc_edge.runtime.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, COMBINATION, MANIFEST, load_bundle

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cmc-edge-checkpoint"
CHECKPOINT_VERSION = 1
FP32_NAME = "delta.onnx"
INT8_NAME = "delta.int8.onnx"
EMBEDDING_NAME = "embedding.npy"
GROUPS_NAME = "head_groups.npz"
TOKENIZER_NAME = "tokenizer.json"
# Copied when present; tokenizer.json alone is what the runtime reads.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_REQUIRED = ("cmc.json", "config.json", "model.safetensors", TOKENIZER_NAME)
_RETRAIN = "point at a directory written by `cmc-edge train`, or re-run training"


@dataclass(frozen=True)
class Checkpoint:
    """A delta training checkpoint directory and its ``cmc.json``."""

    root: Path
    meta: dict

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Check that ``path`` is a complete delta checkpoint of a format this version reads."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"no delta checkpoint at {root} (not a directory)", fix=_RETRAIN)
    missing = [f for f in _REQUIRED if not (root / f).is_file()]
    if missing:
        hint = (" (it looks like an exported bundle, which is already the export's output)"
                if (root / MANIFEST).is_file() else "")
        raise InputError(f"{root} is not a delta checkpoint: it lacks {', '.join(missing)}{hint}", fix=_RETRAIN)
    meta = read_json(root / "cmc.json", "checkpoint metadata (cmc.json)")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{root / 'cmc.json'} has format {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}",
                            fix=_RETRAIN)
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ArtifactError(f"{root / 'cmc.json'} is checkpoint format version {meta.get('format_version')!r}; "
                            f"this cmc-edge exports version {CHECKPOINT_VERSION}",
                            fix="use the cmc-edge version that trained it, or re-run training")
    for key in ("alpha", "template", "prompt_format", "delta_config"):
        if key not in meta:
            raise ArtifactError(f"{root / 'cmc.json'} lacks {key!r}", fix=_RETRAIN)
    return Checkpoint(root=root, meta=meta)


def load_delta_model(ckpt: Checkpoint):
    """The checkpoint's ``LlamaForCausalLM``, fp32, eval mode, eager attention."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt.root, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    want = ckpt.meta["delta_config"].get("vocab_size")
    if want is not None and want != model.config.vocab_size:
        raise ArtifactError(f"{ckpt.root}: cmc.json says vocab_size {want} but config.json says "
                            f"{model.config.vocab_size}", fix=_RETRAIN)
    return model


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, *, int8: bool = True, opset: int | None = None,
                  tolerance: float = 1e-4, overwrite: bool = False, graph: str = "auto") -> Path:
    """Export the delta checkpoint at ``checkpoint_dir`` to a bundle at ``out_dir``; return ``out_dir``.

    Raises :class:`cmc_edge.errors.ExportValidationError` (with ``max_abs_diff``) when the fp32 graph
    differs from PyTorch by more than ``tolerance``, or the INT8 graph fails its agreement check.
    ``graph`` picks the graph writer (:func:`cmc_edge.export.onnx.export_onnx`).
    """
    import numpy as np
    from tqdm.auto import tqdm

    from cmc_edge import __version__
    from cmc_edge.export.onnx import DEFAULT_OPSET, choose_graph, embedding_table, export_onnx, validate_onnx
    from cmc_edge.export.quantize import compare_int8, quantize_int8
    from cmc_edge.runtime.shift import group_rows
    from cmc_edge.tokenmap import read_tokenizer_json

    if not tolerance > 0:
        raise InputError(f"tolerance must be positive, got {tolerance!r}", fix="e.g. --tolerance 1e-4")
    opset = DEFAULT_OPSET if opset is None else opset
    ckpt = read_checkpoint(checkpoint_dir)
    n_tok, n_model = read_tokenizer_json(ckpt.root / TOKENIZER_NAME).size, ckpt.meta["delta_config"].get("vocab_size")
    if isinstance(n_model, int) and n_tok > n_model:
        raise ArtifactError(f"{ckpt.root}: the tokenizer has {n_tok} tokens but the delta model only {n_model}; "
                            "the tokenizer is not the one of the template the delta was trained with", fix=_RETRAIN)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, \
            tqdm(total=5 if int8 else 3, desc="export", unit="stage") as bar:
        bar.set_postfix_str("ONNX")
        model = load_delta_model(ckpt)
        graph = choose_graph(model.config, graph)
        spec = export_onnx(model, tmp / FP32_NAME, opset=opset, graph=graph)
        embedding = embedding_table(model)
        np.save(tmp / EMBEDDING_NAME, embedding, allow_pickle=False)
        labels, centroids = group_rows(embedding)            # the runtime's tight shift bounds
        with open(tmp / GROUPS_NAME, "wb") as fh:
            np.savez(fh, labels=labels, centroids=centroids)
        bar.update()
        bar.set_postfix_str("validate")
        validation = validate_onnx(model, tmp / FP32_NAME, spec, embedding, tolerance=tolerance)
        bar.update()
        models = {"fp32": FP32_NAME}
        if int8:
            bar.set_postfix_str("INT8")
            quantize_int8(tmp / FP32_NAME, tmp / INT8_NAME)
            bar.update()
            bar.set_postfix_str("INT8 check")
            validation["int8"] = compare_int8(tmp / FP32_NAME, tmp / INT8_NAME, spec, embedding)
            models["int8"] = INT8_NAME
            bar.update()
        bar.set_postfix_str("manifest")
        for name in (TOKENIZER_NAME, *TOKENIZER_EXTRAS):
            if (ckpt.root / name).is_file():
                shutil.copyfile(ckpt.root / name, tmp / name)
        vocab = read_tokenizer_json(tmp / TOKENIZER_NAME)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "combination": COMBINATION,
            "default_alpha": ckpt.alpha,
            "objective": ckpt.meta.get("objective"),
            "prompt_format": ckpt.meta["prompt_format"],
            "template": ckpt.meta["template"],
            "delta_vocab_hash": vocab.hash,
            "delta_config": ckpt.meta["delta_config"],
            "onnx": {**spec.to_dict(), "opset": opset, "graph": graph},
            "models": models,
            "tokenizer": TOKENIZER_NAME,
            "embedding": EMBEDDING_NAME,
            "head_groups": GROUPS_NAME,
            "files": files,
            "validation": validation,
            "created_by": f"cmc-edge {__version__}",
            "exported_with": _versions(),
        }
        write_json(tmp / MANIFEST, manifest)
        load_bundle(tmp, verify=True)              # the runtime must accept what we ship
        bar.update()
    log.info("wrote delta bundle %s", out_dir)
    return out_dir


def _positive_alpha(alpha, what: str) -> float:
    import math

    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise InputError(f"{what} must be a positive finite number, got {alpha!r}", fix="pass e.g. 1.0")
    return float(alpha)


def set_default_alpha(bundle_dir: str | Path, alpha: float, *, reason: str) -> None:
    """Record the strength a recipe chose for this bundle (``default_alpha``, and why) in its manifest."""
    _set_manifest(bundle_dir, default_alpha=_positive_alpha(alpha, "a bundle's default alpha"),
                  default_alpha_reason=reason)


def set_model_alpha(bundle_dir: str | Path, model_path: str | Path, alpha: float, *, reason: str) -> None:
    """Record the strength a recipe chose for one model (``model_alphas``, keyed by the model file's
    SHA-256, with its name and why). The runtime runs the bundle at it on that exact file and at
    ``default_alpha`` on every other model."""
    from cmc_edge.models import model_digest

    alpha = _positive_alpha(alpha, "a model's alpha")
    manifest = read_json(Path(bundle_dir) / MANIFEST, "bundle manifest")
    chosen = dict(manifest.get("model_alphas") or {})
    chosen[model_digest(model_path)] = {"alpha": alpha, "model": Path(model_path).name, "reason": reason}
    _set_manifest(bundle_dir, model_alphas=chosen)


def set_shift_floor(bundle_dir: str | Path, floor: float, *, reason: str) -> None:
    """Record the shift floor a recipe chose for this bundle (``shift_floor``, and why) in its manifest:
    at decode time shifts smaller than it are dropped (:func:`cmc_edge.combine.floored_np`)."""
    import math

    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and math.isfinite(floor) and floor >= 0):
        raise InputError(f"a bundle's shift floor must be a finite number >= 0, got {floor!r}",
                         fix="pass e.g. 0.3 (nats), or 0 for none")
    _set_manifest(bundle_dir, shift_floor=float(floor), shift_floor_reason=reason)


def _set_manifest(bundle_dir: str | Path, **fields) -> None:
    """Write ``fields`` into a bundle's manifest (members keep their checksums) and check it loads."""
    path = Path(bundle_dir) / MANIFEST
    manifest = read_json(path, "bundle manifest")
    manifest.update(fields)
    write_json(path, manifest)
    load_bundle(bundle_dir, verify=False)
