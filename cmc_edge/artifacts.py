"""Atomic, self-describing artifacts: temp-name-then-rename writes, checksums, JSON manifests.

An interrupted write never leaves a partial artifact under the final name:

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_path(d / "x.bin") as tmp:
...     _ = tmp.write_bytes(b"hi")
>>> (d / "x.bin").read_bytes()
b'hi'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cmc_edge.errors import ArtifactError, CmcError, InputError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException, final: Path) -> CmcError | None:
    """A clear error for an OSError "no space left" (ENOSPC or quota) anywhere in ``exc``'s chain
    (a Ctrl-C stays a Ctrl-C)."""
    if not isinstance(exc, Exception):
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return CmcError(f"the disk is full (no space left) while writing {final}; nothing was written there",
                            fix=f"free space on the disk that holds {final.parent}, or write to another disk")
        exc = exc.__cause__ or exc.__context__
    return None


_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _make_temp(final: Path, make):
    """``make(dir=...)`` beside ``final`` (mkstemp / mkdtemp), with a clear error when it cannot be."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return make(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        if (full := _disk_full(exc, final)) is not None:
            raise full from exc
        if exc.errno in _NO_WRITE:
            raise CmcError(f"cannot write {final}: {exc.strerror} in {final.parent}",
                           fix="choose an output path in a directory you can write to") from exc
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    fd, tmp = _make_temp(final, tempfile.mkstemp)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if (full := _disk_full(exc, final)) is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; move it into place only if the block succeeds.

    With ``overwrite`` an existing ``final`` is replaced only after the new one is complete (and is
    put back if that last rename fails).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists", fix="choose another output path or pass --overwrite")
    tmp = Path(_make_temp(final, tempfile.mkdtemp))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := _disk_full(exc, final)) is not None:
            raise full from exc
        raise


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found at {path}", fix=f"check the path; a {what} is a JSON file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{what} at {path} is not valid JSON ({exc})",
                            fix="re-create the artifact; it is corrupt or truncated") from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} at {path} is not a JSON object", fix="re-create the artifact")
    return obj


def read_json_lines(path: str | Path, what: str, fix: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed object)`` for each non-blank line of a UTF-8 JSONL file; a missing
    file, invalid UTF-8, invalid JSON or a file without records is an InputError naming file and line
    (``fix`` says what a line must look like)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} not found", fix="pass an existing .jsonl file")
    n = 0
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})",
                                     fix=fix) from exc
                n += 1
                yield lineno, obj
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                             fix="re-save the file as UTF-8") from exc
    if not n:
        raise InputError(f"{what} {path} has no records", fix="add at least one JSON line")


def safe_member(root: Path, name: str) -> Path:
    """Resolve ``name`` inside ``root``; refuse absolute paths and ``..`` escapes."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ArtifactError(f"artifact member {name!r} is not a relative path",
                            fix="bundles may only name files inside their own directory")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ArtifactError(f"artifact member {name!r} points outside {root}",
                            fix="bundles may only name files inside their own directory; re-export it")
    return path
