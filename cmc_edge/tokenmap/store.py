"""Token maps on disk: one ``.npz`` (no pickle) with a JSON header, written atomically, and a cache.

The header carries the format version, both vocabulary hashes and the algorithm version; a map
built for another vocabulary or by another algorithm is refused with an :class:`ArtifactError`
that names what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from cmc_edge.artifacts import atomic_path
from cmc_edge.errors import ArtifactError, CmcError, InputError
from cmc_edge.tokenmap.pmmined import ALGORITHM_VERSION, TokenMap, build_token_map
from cmc_edge.tokenmap.vocab import Vocab, read_gguf_vocab

log = logging.getLogger(__name__)

FORMAT = "cmc-edge/token-map"
FORMAT_VERSION = 1
_REBUILD = "rebuild it with `cmc-edge map --model MODEL --delta BUNDLE --out PATH` (cached maps rebuild themselves)"


def save_token_map(tm: TokenMap, path: str | Path) -> Path:
    """Write ``tm`` to ``path`` (.npz) atomically: an interrupted write leaves no file behind."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "algorithm_version": tm.algorithm_version,
            "target_hash": tm.target_hash, "delta_hash": tm.delta_hash, "target_size": tm.size,
            "counts": tm.counts()}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, index=tm.index, mask=tm.mask, kind=tm.kind,
                 meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8))
    return path


def load_token_map(path: str | Path, *, target_hash: str | None = None, delta_hash: str | None = None) -> TokenMap:
    """Read a map written by :func:`save_token_map`; check its version and, if given, both vocabulary hashes."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"token map {path} not found", fix=_REBUILD)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            index, mask, kind = z["index"], z["mask"], z["kind"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:   # JSON/Unicode errors: ValueError
        raise ArtifactError(f"{path} is not a readable token map ({type(exc).__name__}: {exc})", fix=_REBUILD) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a cmc-edge token map", fix=_REBUILD)
    differ = []
    if meta.get("format_version") != FORMAT_VERSION:
        differ.append(f"format version {meta.get('format_version')} (this cmc-edge reads {FORMAT_VERSION})")
    if meta.get("algorithm_version") != ALGORITHM_VERSION:
        differ.append(f"algorithm version {meta.get('algorithm_version')} (this cmc-edge builds {ALGORITHM_VERSION})")
    for side, want in (("target", target_hash), ("delta", delta_hash)):
        got = meta.get(f"{side}_hash")
        if want is not None and got != want:
            differ.append(f"{side} vocabulary {str(got)[:12]} (expected {want[:12]})")
    if differ:
        raise ArtifactError(f"token map {path} is stale or foreign: " + "; ".join(differ), fix=_REBUILD)
    if index.dtype != np.int32 or mask.dtype != bool or kind.dtype != np.uint8 or meta.get("target_size") != len(index):
        raise ArtifactError(f"token map {path} has arrays of the wrong type or size", fix=_REBUILD)
    try:
        return TokenMap(index, mask, kind, meta["target_hash"], meta["delta_hash"], meta["algorithm_version"])
    except CmcError as exc:
        raise ArtifactError(f"token map {path} is inconsistent: {exc.problem}", fix=_REBUILD) from exc


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def map_cache_name(target_hash: str, target_roles: dict, delta: Vocab) -> str:
    """Cache file name: both vocabulary hashes, the algorithm version, and the roles (which decide the
    SPECIAL_ROLE entries but come from metadata outside the vocabulary hash)."""
    roles = _digest([target_roles, delta.roles])[:8]
    return f"tokenmap-{target_hash[:16]}-{delta.hash[:16]}-{roles}-a{ALGORITHM_VERSION}.npz"


def cached_token_map(gguf_path: str | Path, delta: Vocab, cache_dir: str | Path) -> TokenMap:
    """The map from a GGUF model's vocabulary to ``delta``: built on first use, loaded afterwards.

    A small ``vocab-*.json`` note keyed by the GGUF's path, size and mtime remembers its vocabulary hash
    and roles, so a cache hit does not read the vocabulary again; the map itself is keyed by both
    vocabulary hashes and the algorithm version, and checked against them on load.
    """
    gguf_path = Path(gguf_path)
    cache_dir = Path(cache_dir)
    try:
        st = gguf_path.stat()
    except OSError as exc:
        raise InputError(f"model {gguf_path} not found ({exc})", fix="give the path to a .gguf file") from exc
    note = cache_dir / f"vocab-{_digest([str(gguf_path.resolve()), st.st_size, st.st_mtime_ns])[:16]}.json"
    if note.is_file():
        try:
            known = json.loads(note.read_text(encoding="utf-8"))
            path = cache_dir / map_cache_name(known["target_hash"], known["roles"], delta)
            if path.is_file():
                return load_token_map(path, target_hash=known["target_hash"], delta_hash=delta.hash)
        except (ValueError, KeyError, TypeError, ArtifactError) as exc:
            log.warning("rebuilding the token map for %s: the cached one is unusable (%s)", gguf_path.name, exc)
    t0 = time.perf_counter()
    target = read_gguf_vocab(gguf_path)
    tm = build_token_map(target, delta)
    save_token_map(tm, cache_dir / map_cache_name(target.hash, target.roles, delta))
    with atomic_path(note) as tmp:
        tmp.write_text(json.dumps({"gguf": str(gguf_path.resolve()), "target_hash": target.hash,
                                   "roles": target.roles}, sort_keys=True), encoding="utf-8")
    log.info("token map %s -> delta built in %.2fs: %s", gguf_path.name, time.perf_counter() - t0, tm.counts())
    return tm
