"""Files grok-deploy writes outside a stage folder, opened safely: the lock, logs, reports, the
Kubernetes manifest.

Nothing is opened through a symlink (O_NOFOLLOW), and nothing we did not write is ever truncated
or replaced. The lock must be a regular file we created (or an earlier lock's leftover text). A
loose file (a log, a copied report, the --k8s manifest) is written to a temp name beside its
target and renamed over it, and only over a target that is absent or that we generated: every
folder holding such files has a `.grok-deploy-files` registry naming each file we wrote there
with its size and sha256 (a log, written while it grows, by its name only). A user's file of the
same name, the pipeline file, a symlink, a FIFO or a device is refused with a UserError.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from grok_deploy.errors import UserError, is_no_space, no_space

LOCK = ".grok-deploy.lock"
REGISTRY = ".grok-deploy-files"  # {"made_by": "grok-deploy", "files": {name: {"bytes", "sha256"} | {"stream": what}}}
MAX_REGISTRY_BYTES = 1 << 20
_LOCK_TEXT = re.compile(rb"\A(?:\d+ [^\n\0]{0,400}\n?)?\Z")  # "<pid> <what>\n", as lock() writes it
_HELD: dict[str, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a symlink" if stat.S_ISLNK(mode) else "a file")


def _open_lock(path: Path) -> int:
    """An fd on `path`, a lock file we create now or one whose text is an earlier lock's; anything
    else (a symlink, a FIFO, a folder, a hard-linked or user file) is refused, untouched."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as e:
            what = _kind(os.lstat(path).st_mode) if os.path.lexists(path) else e.strerror
            raise UserError(f"{path}: exists and is {what}, not a lock file grok-deploy made; nothing was changed; "
                            "remove it yourself or write elsewhere") from None
    except OSError as e:
        raise UserError(f"{path}: cannot create the lock file ({e.strerror}); write elsewhere") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"is {_kind(st.st_mode)}"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links (another file's name)"
    elif not created and not _LOCK_TEXT.match(os.pread(fd, 4097, 0)):
        problem = "holds text that is not a grok-deploy lock's"
    if problem:
        os.close(fd)
        raise UserError(f"{path}: {problem}, not a lock file grok-deploy made; nothing was changed; remove it "
                        "yourself or write elsewhere")
    return fd


@contextmanager
def lock(folder: str | Path, what: str = "grok-deploy") -> Iterator[Path]:
    """Hold `folder/.grok-deploy.lock` (flock, released by the kernel even after SIGKILL); a
    second process gets a UserError naming the holder's pid. The file goes when released (if it
    is still the one we locked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    key = os.path.join(os.path.realpath(folder), LOCK)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").split(" ", 1)
            os.close(fd)
            pid = holder[0] if holder[0].isdigit() else "unknown"
            doing = holder[1].strip() if len(holder) > 1 else str(path)
            raise UserError(f"{folder}: another grok-deploy process (pid {pid}) is writing here ({doing}); "
                            "wait for it to finish or stop it") from None
        if _same(path, fd):
            break
        os.close(fd)  # the holder before us removed the file between our open and our lock: again
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    _HELD[key] = [fd, 0]
    try:
        yield path
    finally:
        del _HELD[key]
        if _same(path, fd):  # never a file put in its place meanwhile (a FIFO, a user's file)
            path.unlink(missing_ok=True)  # still locked: a newcomer opening it now retries on a new file
        os.close(fd)


def _same(path: Path, fd: int) -> bool:
    try:
        a, b = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# --- generated files ------------------------------------------------------------------------

def _read_registry(folder: Path) -> dict:
    try:
        fd = os.open(folder / REGISTRY, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        doc = json.loads(os.pread(fd, MAX_REGISTRY_BYTES, 0))
    except (OSError, ValueError, RecursionError):
        return {}
    finally:
        os.close(fd)
    files = doc.get("files") if isinstance(doc, dict) and doc.get("made_by") == "grok-deploy" else None
    return files if isinstance(files, dict) else {}


@contextmanager
def _registry(folder: Path) -> Iterator[dict]:
    """The folder's registry under an flock on the folder itself; written back (tmp + rename) after."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        files = _read_registry(folder)
        yield files
        _write_atomic(folder / REGISTRY, json.dumps({"made_by": "grok-deploy", "files": files}, indent=1).encode())
    finally:
        os.close(dfd)


def _sha256(path: Path, limit: int = 1 << 30) -> str | None:
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            limit -= len(block)
            if limit < 0:
                return None
    return h.hexdigest()


def replace_file_problem(path: str | Path, new_folder_ok: bool = False) -> str | None:
    """Why a file we generate may not be written at `path`, or None: only an absent file or one
    the folder's registry says we wrote (with the same size and sha256, a log by its name).
    `new_folder_ok`: a missing folder is fine (it will be made)."""
    path = Path(path)
    folder = path.parent
    if "\0" in str(path):
        return f"{str(path)!r}: the path contains a NUL character"
    try:
        if new_folder_ok and not os.path.lexists(folder):
            return None
        if not folder.is_dir():
            return f"{path}: its folder {folder} does not exist (or is not a folder)"
        if path.name in ("", ".", "..") or path.name in (REGISTRY, LOCK):
            return f"{path}: not a file name grok-deploy may write"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror}); choose another file name"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: exists and is {_kind(st.st_mode)}; nothing was changed; choose another file name"
    entry = _read_registry(folder).get(path.name)
    ours = isinstance(entry, dict) and (
        "stream" in entry or (entry.get("bytes") == st.st_size and entry.get("sha256") == _sha256(path)))
    if not ours:
        why = "was changed since grok-deploy wrote it" if isinstance(entry, dict) else "was not written by grok-deploy"
        return (f"{path}: exists and {why}; nothing was changed; move it away yourself or choose another "
                "file name")
    return None


def _check(path: Path) -> None:
    problem = replace_file_problem(path)
    if problem:
        raise UserError(problem)


def _new_temp(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:200]}.tmp-{os.getpid()}-", dir=path.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as open() would make it (mkstemp: 0600)
    return fd, Path(name)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_generated(path: str | Path, data: bytes | str) -> Path:
    """Write `data` as `path` (temp name, fsync, rename), only over a file we generated."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    _check(path)
    try:
        with _registry(path.parent) as files:
            _check(path)  # again, under the folder's flock
            _write_atomic(path, data)
            files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except OSError as e:
        if is_no_space(e):
            raise no_space(path, len(data), what) from None
        raise UserError(f"{path}: cannot be written ({e.strerror}); nothing was replaced") from None
    return path


def copy_generated(src: str | Path, dst: str | Path) -> Path:
    return write_generated(dst, Path(src).read_bytes())


def open_generated(path: str | Path, what: str, mode: str = "w") -> IO:
    """A new file at `path` to write while it grows (a log): created under a temp name, renamed
    over `path` at once (only over a file we generated) and registered; returns it open."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check(path)
    try:
        with _registry(path.parent) as files:
            _check(path)
            fd, tmp = _new_temp(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            files[path.name] = {"stream": what}
    except OSError as e:
        if is_no_space(e):
            raise no_space(path, None, what) from None
        raise UserError(f"{path}: cannot be written ({e.strerror})") from None
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "errors": "replace"}))

