"""Stage folders: fingerprints, manifest.json, and the atomic write (tmp folder, rename, manifest last).

A stage writes into `<out>.tmp-XXXX`; `commit` swaps it into place and writes `manifest.json`
last, so a folder without a complete manifest (a crash, a SIGKILL) is never taken as done.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
KEEP = ("README.md",)  # committed files inside output folders (triton_repo/README.md) survive a swap


def fingerprint(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict | None:
    """The stage manifest of `folder`, or None when absent, unreadable or incomplete.

    The runner's part is under "runner" ({name, fingerprint, version, inputs, upstream, created,
    seconds, complete}); every other key is the stage core's own manifest."""
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    meta = doc.get("runner") if isinstance(doc, dict) else None
    return doc if isinstance(meta, dict) and meta.get("complete") is True and meta.get("fingerprint") else None


def write_json_atomic(path: Path, doc: dict, indent: int = 1) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_tmp(out: Path) -> Path:
    """An empty `<out>.tmp-XXXX` beside `out` (same file system, so the rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))


def clean_stale(out: Path) -> list[Path]:
    """Remove the leftovers of interrupted writes of `out` (tmp and old folders)."""
    gone = [p for pat in (".tmp-*", ".old-*") for p in out.parent.glob(out.name + pat)] if out.parent.exists() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def commit(tmp: Path, out: Path, manifest: dict | None = None, write: bool = True) -> Path:
    """Move `tmp` into place as `out`, then write its manifest.json, last.

    A manifest.json the stage core wrote into `tmp` is held back and merged under `manifest`.
    `write=False` writes none: the folder is kept but "not done" (e.g. a failed check).
    """
    core = tmp / MANIFEST
    core_doc = json.loads(core.read_text()) if core.exists() else {}
    core.unlink(missing_ok=True)
    old = None
    if out.exists():
        (out / MANIFEST).unlink(missing_ok=True)  # invalidate first: a crash below leaves "not done"
        for name in KEEP:
            if (out / name).exists() and not (tmp / name).exists():
                shutil.copy2(out / name, tmp / name)
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if write and (manifest or core_doc):
        write_json_atomic(out / MANIFEST, {**core_doc, **(manifest or {})})
    return out


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into tmp (manifest.json included); on success tmp
    replaces `out` and its manifest.json is written last; on any exception tmp is removed."""
    out = Path(out)
    tmp = new_tmp(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, out)


def folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
