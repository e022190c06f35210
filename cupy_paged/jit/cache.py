"""The on-disk cubin cache: file names, verified loads, atomic stores and per-key locks.

An entry is ``<name>-<arch>-<key16>.cubin`` beside a ``.json`` holding the cubin's sha256 and
size; a cubin that does not match its json is treated as absent and rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; atomic renames still keep every entry whole
    fcntl = None

logger = logging.getLogger("cupy_paged.jit")


def cache_dir() -> Path:
    """$CUPY_PAGED_CACHE_DIR, else ~/.cache/cupy_paged; created on first use."""
    path = Path(os.environ.get("CUPY_PAGED_CACHE_DIR") or Path.home() / ".cache" / "cupy_paged")
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest_tree(root: Path) -> str:
    """sha256 over every file under ``root`` (relative path and content, in sorted order).

    cuda_src is small (tens of files), so hashing all of it on each compile costs milliseconds
    and guarantees an edited header never reuses a stale cubin.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """The files of one cache entry."""

    cubin: Path
    meta: Path
    lock: Path

    @classmethod
    def of(cls, name: str, arch: str, key: str) -> Entry:
        stem = cache_dir() / f"{name}-{arch}-{key[:16]}"
        return cls(stem.with_suffix(".cubin"), stem.with_suffix(".json"), stem.with_suffix(".lock"))


def load(entry: Entry) -> dict | None:
    """The entry's metadata if its cubin exists and matches the recorded size and sha256."""
    try:
        meta = json.loads(entry.meta.read_text())
        data = entry.cubin.read_bytes()
    except (OSError, ValueError):
        return None
    if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        logger.warning("cache entry %s is corrupted (size or sha256 mismatch); rebuilding",
                       entry.cubin.name)
        return None
    return meta


def store(entry: Entry, cubin: bytes, meta: dict) -> dict:
    """Write the cubin, then its metadata, each atomically; returns the metadata written."""
    meta = {**meta, "size": len(cubin), "sha256": hashlib.sha256(cubin).hexdigest()}
    _write_atomic(entry.cubin, cubin)
    _write_atomic(entry.meta, json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


@contextlib.contextmanager
def locked(entry: Entry):
    """Hold the entry's lock file, so concurrent processes build one entry once."""
    if fcntl is None:
        yield
        return
    with open(entry.lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
