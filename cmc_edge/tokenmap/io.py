"""Token map artifacts: one .npz (no pickle) with a JSON header; atomic writes; a cache by vocab hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from cmc_edge.artifacts import atomic_path
from cmc_edge.errors import ArtifactError
from cmc_edge.tokenmap.pmmined import ALGORITHM_VERSION, MATCH_NAMES, TokenMap, build_token_map
from cmc_edge.tokenmap.vocab import Vocab, read_gguf_vocab

log = logging.getLogger(__name__)
FORMAT = "cmc-edge-tokenmap"
FORMAT_VERSION = 1


def save_token_map(tm: TokenMap, path: str | Path) -> Path:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "target_hash": tm.target_hash,
            "delta_hash": tm.delta_hash, "algorithm_version": tm.algorithm_version}
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, index=tm.index, mask=tm.mask, kind=tm.kind,
                     meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return path


def load_token_map(path: str | Path, *, target_hash: str | None = None, delta_hash: str | None = None) -> TokenMap:
    path = Path(path)
    fix = "rebuild it: `cmc-edge map --model MODEL --delta BUNDLE` (or delete the cached file)"
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            index, mask, kind = z["index"], z["mask"], z["kind"]
    except FileNotFoundError:
        raise ArtifactError(f"token map {path} not found", fix=fix) from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"token map {path} is corrupt or not a token map ({exc})", fix=fix) from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} is not a cmc-edge token map of format version {FORMAT_VERSION}", fix=fix)
    if meta.get("algorithm_version") != ALGORITHM_VERSION:
        raise ArtifactError(f"{path} was built by token-map algorithm {meta.get('algorithm_version')}, "
                            f"this cmc-edge uses {ALGORITHM_VERSION}", fix=fix)
    for name, want in (("target", target_hash), ("delta", delta_hash)):
        got = meta.get(f"{name}_hash")
        if want is not None and got != want:
            raise ArtifactError(f"token map {path} was built for another {name} vocabulary "
                                f"(hash {str(got)[:12]}, expected {want[:12]})", fix=fix)
    if not (index.shape == mask.shape == kind.shape):
        raise ArtifactError(f"token map {path} has inconsistent arrays", fix=fix)
    return TokenMap(index.astype(np.int32), mask.astype(bool), kind.astype(np.uint8), meta["target_hash"],
                    meta["delta_hash"], meta["algorithm_version"])


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cached_token_map(gguf_path: str | Path, delta: Vocab, cache_dir: str | Path) -> TokenMap:
    """The map from a GGUF's vocabulary to ``delta``: built on first use, then loaded from the cache.

    The cache key covers the GGUF file (path, size, mtime), the delta vocabulary hash and the
    algorithm version; the stored map also carries both vocabulary hashes, checked on load.
    """
    gguf_path = Path(gguf_path)
    cache_dir = Path(cache_dir)
    key = f"{_file_key(gguf_path)}-{delta.hash[:16]}-a{ALGORITHM_VERSION}"
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        try:
            return load_token_map(path, delta_hash=delta.hash)
        except ArtifactError as exc:
            log.warning("ignoring a bad cached token map: %s", exc)
    t0 = time.perf_counter()
    target = read_gguf_vocab(gguf_path)
    tm = build_token_map(target, delta)
    save_token_map(tm, path)
    log.info("built token map %s -> delta in %.1fs (%s)", gguf_path.name, time.perf_counter() - t0,
             ", ".join(f"{MATCH_NAMES[k]} {int((tm.kind == k).sum())}" for k in MATCH_NAMES if (tm.kind == k).any()))
    return tm
