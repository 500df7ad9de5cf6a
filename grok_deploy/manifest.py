"""Stage folders: fingerprints, manifest.json, and the atomic write (tmp folder, rename, manifest last).

A stage writes into `<out>.tmp-<pid>-XXXX`; `commit` swaps it into place and writes
`manifest.json` last, so a folder without a complete manifest (a crash, a SIGKILL) is never taken
as done. Every folder a stage makes carries a small `.grok-deploy` mark naming the stage: a stage
only ever replaces a folder that holds its own mark (or manifest) or an empty one, never a user's
folder (`replace_problem`). Leftover tmp folders are removed at the next start only when the
process named in their name is gone (`clean_stale`), and `lock` keeps two runs out of one folder.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from grok_deploy.errors import UserError, mount_point

MANIFEST = "manifest.json"
MARK = ".grok-deploy"       # {"made_by": "grok-deploy", "stage": kind}: written first into every tmp folder
KEEP = ("README.md",)  # committed files inside output folders (triton_repo/README.md) survive a swap
MAX_MANIFEST_BYTES = 64 << 20
_PID = re.compile(r"\.(?:tmp|old)-(\d+)-")  # the writer's pid in a tmp/old folder name


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
        doc = json.loads(_read_small(Path(folder) / MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):
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


def _read_small(path: Path, limit: int) -> str:
    """The text of a regular file of at most `limit` bytes (OSError otherwise: a FIFO or a device
    would block or never end)."""
    with open(path, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data.decode()


def owner(folder: Path) -> str | None:
    """The stage that made `folder` (its mark, else a manifest of ours), or None."""
    try:
        doc = json.loads(_read_small(folder / MARK, 4096))
        if isinstance(doc, dict) and doc.get("made_by") == "grok-deploy":
            return str(doc.get("stage") or "")
    except (OSError, ValueError):
        pass
    try:
        doc = json.loads(_read_small(folder / MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    runner, made = doc.get("runner"), str(doc.get("produced_by") or "")
    if isinstance(runner, dict) and runner.get("name"):
        return str(runner["name"])
    if made.startswith("grok-deploy "):
        return made.split(" ", 1)[1]
    return str(doc["stage"]) if doc.get("stage") and "version" in doc else None


def _entries(folder: Path) -> list[str]:
    return sorted(set(os.listdir(folder)) - {MARK, *KEEP})


def is_empty(folder: Path) -> bool:
    """No such folder, or one holding nothing but our mark and KEEP files."""
    return not os.path.lexists(folder) or (folder.is_dir() and not folder.is_symlink() and not _entries(folder))


def replace_problem(out: Path, kind: str | None) -> str | None:
    """Why stage `kind` may not replace `out`, or None: only an absent or empty folder, or one
    that stage `kind` made (None: any stage of ours), may be replaced."""
    out = Path(out)
    try:
        if not os.path.lexists(out):
            return None
        if out.is_symlink() or not out.is_dir():
            return (f"{out}: exists and is not a folder ({'a symlink' if out.is_symlink() else 'a file'}); "
                    "choose another output folder or remove it yourself")
        entries = _entries(out)
    except OSError as e:
        return f"{out}: cannot be read ({e.strerror}); choose another output folder"
    made = owner(out)
    if not entries or (made is not None and (kind is None or made == kind)):
        return None
    by = f"by grok-deploy {kind or ''}".rstrip() + (f" (grok-deploy {made} wrote it)" if made else "")
    return (f"{out}: is not empty and was not written {by}: {len(entries)} entries: {', '.join(map(repr, entries[:3]))}{' ...' if len(entries) > 3 else ''}; "
            "nothing was changed; choose a new or empty output folder, or empty this one yourself")


def check_replaceable(out: Path, kind: str | None) -> None:
    problem = replace_problem(out, kind)
    if problem:
        raise UserError(problem)


def overlaps(a: str | Path, b: str | Path) -> bool:
    """One of the two folders is the other or lies inside it (symlinks resolved)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: Path, src: Path, kind: str) -> None:
    """A command's output folder: not the source, not inside it, not holding it; replaceable."""
    if "\0" in str(out):
        raise UserError(f"{str(out)!r}: the output path contains a NUL character")
    if overlaps(out, src):
        raise UserError(f"{out}: the output folder overlaps the source {src} (writing it would replace "
                        "the source); choose a folder outside it")
    check_replaceable(out, kind)


def check_space(out: Path, need: int, what: str) -> None:
    """Refuse, before anything is written, an output its file system cannot hold (the tmp folder
    sits beside `out`, and an earlier output there is removed only after the swap)."""
    where = Path(os.path.abspath(out))
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"{out}: {what} needs {need / 1e9:.2f} GB ({need} bytes) and {where} has {free / 1e9:.2f} GB "
                        f"({free} bytes) free on the file system mounted at {mount_point(where)}; "
                        "free space there or write the output elsewhere")


def new_tmp(out: Path, kind: str | None = None) -> Path:
    """An empty `<out>.tmp-<pid>-XXXX` beside `out` (same file system, so the rename is atomic),
    holding only the mark of stage `kind`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    mark(tmp, kind)
    return tmp


def mark(folder: Path, kind: str | None) -> None:
    """Write the mark that says stage `kind` made `folder` (same bytes every time)."""
    (folder / MARK).write_text(json.dumps({"made_by": "grok-deploy", "stage": kind}) + "\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the leftovers of interrupted writes of `out` (tmp and old folders) whose writer is
    gone; a live writer's folder (another process at work) is left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    gone = []
    for pat in (".tmp-*", ".old-*"):
        for p in out.parent.glob(out.name + pat):
            m = _PID.search(p.name[len(out.name):])
            if m and _alive(int(m.group(1))):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


# --- one writer at a time ---------------------------------------------------------------------

LOCK = ".grok-deploy.lock"
_HELD: dict[str, list] = {}  # lock file -> [open file, depth]: re-entrant within one process


@contextmanager
def lock(folder: str | Path, what: str = "grok-deploy") -> Iterator[Path]:
    """Hold `folder/.grok-deploy.lock` (flock, released by the kernel even after SIGKILL); a
    second process gets a UserError naming the holder's pid. The file goes when released."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block, a folder fail
        raise UserError(f"{path}: exists and is not a regular file (a folder, FIFO, device or symlink), not a lock "
                        "file grok-deploy made; nothing was changed; remove it yourself or write elsewhere")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read(300).split(" ", 1)
            f.close()
            pid = holder[0] if holder[0].isdigit() else "unknown"
            doing = holder[1].strip() if len(holder) > 1 else str(path)
            raise UserError(f"{folder}: another grok-deploy process (pid {pid}) is writing here ({doing}); "
                            "wait for it to finish or stop it") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder before us removed the file between our open and our lock: again
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {what}\n")
    f.flush()
    _HELD[key] = [f, 0]
    try:
        yield path
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)  # still locked: a newcomer opening it now retries on a new file
        f.close()


def commit(tmp: Path, out: Path, manifest: dict | None = None, write: bool = True, kind: str | None = None) -> Path:
    """Move `tmp` into place as `out`, then write its manifest.json, last.

    A manifest.json the stage core wrote into `tmp` is held back and merged under `manifest`.
    `write=False` writes none: the folder is kept but "not done" (e.g. a failed check).
    `out` must be absent, empty or made by the stage named in tmp's mark (or `kind`, written
    into tmp's mark first); anything else is a UserError and nothing moves.
    """
    if kind is not None:
        mark(tmp, kind)
    check_replaceable(out, owner(tmp) or None)
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
def atomic_dir(out: str | Path, kind: str | None = None) -> Iterator[Path]:
    """`with atomic_dir(out, kind) as tmp:` write into tmp (manifest.json included); on success
    tmp replaces `out` and its manifest.json is written last; on any exception tmp is removed.
    `out` must be absent, empty or made by stage `kind` (checked before and at the swap)."""
    out = Path(out)
    check_replaceable(out, kind)
    clean_stale(out)
    tmp = new_tmp(out, kind)
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
