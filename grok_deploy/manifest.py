"""Stage folders: fingerprints, manifest.json, and the atomic write (tmp folder, rename, manifest last).

A stage writes into `<out>.tmp-<pid>-XXXX`; `commit` swaps it into place and writes
`manifest.json` last, so a folder without a complete manifest (a crash, a SIGKILL) is never taken
as done. Every folder a stage makes carries a `.grok-deploy` mark: the stage, the output path it
was made for, its owner process (pid, start time, host, boot) and, once committed, the inventory
of every entry in it (names, types, sizes). Delete only what we wrote (`replace_problem`): a stage
replaces a folder only when it is empty, or when its mark is that stage's, for that path, and
lists every entry the folder holds as it is; anything else (a user's file added to our output, a
mark alone or forged, another tool's manifest.json, a folder inside another output) is refused
naming the first unknown entry, and nothing is touched. `clean_stale` removes only tmp/old
folders whose mark names them and a dead owner; `safe_files.lock` keeps two runs out of one folder.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from grok_deploy.errors import UserError, mount_point

MANIFEST = "manifest.json"
MARK = ".grok-deploy"  # our mark in every folder a stage makes (see `mark`)
MARK_FORMAT = 2        # marks without "mark": 2 (earlier releases', or forged ones) own nothing
KEEP = ("README.md",)  # committed files inside output folders (triton_repo/README.md) survive a swap
MAX_MANIFEST_BYTES = 64 << 20


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


def write_json_atomic(path: Path, doc: dict, indent: int | None = 1) -> None:
    """`doc` as `path`: a new temp file beside it (O_EXCL), fsynced, renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=indent, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_small(path: Path, limit: int, nofollow: bool = False) -> str:
    """The text of a regular file of at most `limit` bytes (OSError otherwise: a FIFO or a device
    would block or never end); `nofollow`: not through a symlink."""
    extra = os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
    with open(path, "rb", opener=lambda p, fl: os.open(p, fl | extra)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data.decode()


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_ME = {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname(), "boot": _boot_id()}


def _me() -> dict:
    if _ME["pid"] != os.getpid():  # a forked child
        _ME.update(pid=os.getpid(), start=_start_time(os.getpid()))
    return dict(_ME)


def _real(out: Path) -> str:
    """The output path as a mark records it (its folder's symlinks resolved)."""
    out = Path(os.path.abspath(out))
    return os.path.join(os.path.realpath(out.parent), out.name)


def _read_mark(folder: Path) -> dict | None:
    """Our mark in `folder` (a regular file holding a complete mark of this format), or None."""
    try:
        doc = json.loads(_read_small(Path(folder) / MARK, MAX_MANIFEST_BYTES, nofollow=True))
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(doc, dict) and doc.get("made_by") == "grok-deploy" and doc.get("mark") == MARK_FORMAT
            and isinstance(doc.get("path"), str) and isinstance(doc.get("folder"), str)
            and (doc.get("stage") is None or isinstance(doc.get("stage"), str))
            and isinstance(doc.get("entries", {}), dict)):
        return None
    return doc


def mark(folder: Path, kind: str | None, out: Path | None = None, entries: dict | None = None,
         name: str | None = None) -> None:
    """Write the mark that says stage `kind` made `folder` for the output `out` (default: the
    folder itself), by this process; `entries`: the folder's inventory (what it may hold)."""
    doc = {"made_by": "grok-deploy", "mark": MARK_FORMAT, "stage": kind, "path": _real(out or folder),
           "folder": name or Path(folder).name, **_me()}
    if entries is not None:
        doc["entries"] = entries
    write_json_atomic(Path(folder) / MARK, doc, indent=None)


def owner(folder: Path) -> str | None:
    """The stage named by `folder`'s mark (our mark, whatever it lists), or None."""
    doc = _read_mark(Path(folder))
    return None if doc is None else str(doc.get("stage") or "")


def _top_skipped(folder: Path, name: str) -> bool:
    """Entries an inventory leaves out: the mark, manifest.json (written after the swap) and KEEP
    files, each only as a regular file."""
    if name not in (MARK, MANIFEST, *KEEP):
        return False
    try:
        return stat.S_ISREG(os.lstat(folder / name).st_mode)
    except OSError:
        return False


def inventory(folder: Path) -> dict[str, list]:
    """Every entry under `folder` (symlinks not followed): {relative path: ["f", bytes] | ["d"] |
    ["l", target] | ["?"]}, without the top-level entries of `_top_skipped`."""
    out: dict[str, list] = {}
    todo = [(Path(folder), "")]
    while todo:
        where, rel = todo.pop()
        with os.scandir(where) as it:
            for e in it:
                if not rel and _top_skipped(where, e.name):
                    continue
                r = rel + e.name
                if e.is_symlink():
                    out[r] = ["l", os.readlink(e.path)]
                elif e.is_dir(follow_symlinks=False):
                    out[r] = ["d"]
                    todo.append((Path(e.path), r + "/"))
                elif e.is_file(follow_symlinks=False):
                    out[r] = ["f", e.stat(follow_symlinks=False).st_size]
                else:
                    out[r] = ["?"]
    return dict(sorted(out.items()))


def _first_unknown(folder: Path, doc: dict | None) -> tuple[str, str] | None:
    """(first entry of `folder` its mark does not list as it is, why), or None when the mark
    lists every entry. Without a mark, the first top-level entry (the user's before a mark's)."""
    if doc is None or "entries" not in doc:
        names = [n for n in sorted(os.listdir(folder)) if not (n in KEEP and _top_skipped(folder, n))]
        names.sort(key=lambda n: n in (MARK, MANIFEST))
        if not names:
            return None
        if doc is not None:
            return names[0], "its mark lists nothing it may hold"
        held = f"; it holds {len(names)} entries: {', '.join(map(repr, names[:3]))}{' ...' if len(names) > 3 else ''}"
        if os.path.lexists(folder / MARK):
            return names[0], (f"its {MARK} is not a grok-deploy mark" if _top_skipped(folder, MARK)
                              else f"its {MARK} is not a file") + held
        return names[0], "it has no grok-deploy mark" + held
    listed = doc["entries"]
    for rel, what in inventory(folder).items():
        if rel not in listed:
            return rel, "not among the entries grok-deploy wrote"
        if listed[rel] != what:
            return rel, "changed since grok-deploy wrote it"
    return None


def _own_tmp(folder: Path, doc: dict | None) -> bool:
    """`folder` is a tmp folder this process made and has not filled (only its mark)."""
    return (doc is not None and doc.get("folder") == folder.name and doc.get("pid") == os.getpid()
            and doc.get("start") == _me()["start"] and set(os.listdir(folder)) == {MARK})


def enclosing_output(out: Path) -> Path | None:
    """The nearest folder above `out` that holds a grok-deploy mark (another output's stage
    folder, which its stage replaces whole), or None."""
    up = Path(os.path.realpath(Path(os.path.abspath(out)).parent))
    for d in (up, *up.parents):
        if _top_skipped(d, MARK):  # a mark file (a `.grok-deploy/` folder, e.g. a tool's ~/.grok-deploy, is not)
            return d
    return None


def is_empty(folder: Path) -> bool:
    """No such folder, or one holding nothing but KEEP files."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(n in KEEP and _top_skipped(folder, n) for n in os.listdir(folder))


def replace_problem(out: Path, kind: str | None) -> str | None:
    """Why stage `kind` may not replace `out`, or None. Only an absent or empty folder (KEEP files
    aside, which survive), or one whose mark says stage `kind` (None: any stage) made it at this
    path and lists every entry it holds, may be replaced; never a folder inside another output."""
    out = Path(out)
    inside = enclosing_output(out)
    if inside is not None:
        made = owner(inside)
        return (f"{out}: lies inside {inside}, an output folder of grok-deploy{' ' + made if made else ''} (another "
                "pipeline's or command's), which its stage replaces whole; nothing was changed; choose an output "
                "folder outside it")
    try:
        if not os.path.lexists(out):
            return None
        if out.is_symlink() or not out.is_dir():
            return (f"{out}: exists and is not a folder ({'a symlink' if out.is_symlink() else 'a file'}); "
                    "choose another output folder or remove it yourself")
        if is_empty(out):
            return None
        doc = _read_mark(out)
        if _own_tmp(out, doc):
            return None
        made = None if doc is None else str(doc.get("stage") or "")
        if doc is not None and kind is not None and made != kind:
            unknown = (sorted(n for n in os.listdir(out) if n not in (MARK, MANIFEST)) or [MARK])[0], \
                f"grok-deploy {made} wrote it"
        elif doc is not None and doc["path"] != _real(out):  # a copy or a move: name what the user added, if any
            unknown = _first_unknown(out, doc) or (MARK, "")
            unknown = unknown[0], (unknown[1] + "; " if unknown[1] else "") + (
                f"its mark was written for {doc['path']}, not for this folder (a copy or a move)")
        else:
            unknown = _first_unknown(out, doc)
    except OSError as e:
        return f"{out}: cannot be read ({e.strerror}); choose another output folder"
    if unknown is None:
        return None
    name, why = unknown
    by = f"by grok-deploy {kind or ''}".rstrip()
    return (f"{out}: is not empty and was not written {by}: first unknown entry {name!r} ({why}); nothing was "
            "changed; choose a new or empty output folder, or move this one away yourself")


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
    holding only the mark of stage `kind` for `out`, with this process as its owner."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    mark(tmp, kind, out)
    return tmp


def _owner_gone(doc: dict) -> bool:
    """The process a mark names (pid and start time, on this host) has exited; a pid now used by
    another process (another start time) counts as gone, an owner on another host never does."""
    me = _me()
    if doc.get("host") != me["host"]:
        return False
    if doc.get("boot") != me["boot"]:
        return True  # rebooted since
    pid = doc.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    start = _start_time(pid)
    return start is None or start != doc.get("start")


def clean_stale(out: Path) -> list[Path]:
    """Remove the leftovers of interrupted writes of `out`: only `<out>.tmp-*` / `<out>.old-*`
    folders whose mark (ours) names `out` (or a tmp folder of it), that folder's own name and an
    owner that has exited (an old folder, besides, must hold only what its mark lists). Anything
    else of those names (a user's `out.old-backup`, a live writer's tmp folder) is left alone."""
    out = Path(out)
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return []
    gone, real = [], _real(out)
    for name in names:
        rest = name[len(out.name):] if name.startswith(out.name) else ""
        if not rest.startswith((".tmp-", ".old-")):
            continue
        p = out.parent / name
        if p.is_symlink() or not p.is_dir():
            continue
        doc = _read_mark(p)
        if doc is None or doc["folder"] != name or not _owner_gone(doc):
            continue
        if doc["path"] != real and not doc["path"].startswith(real + ".tmp-"):  # a core's tmp in the runner's
            continue
        if rest.startswith(".old-") and _first_unknown(p, doc if "entries" in doc else None) is not None:
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def commit(tmp: Path, out: Path, manifest: dict | None = None, write: bool = True, kind: str | None = None) -> Path:
    """Move `tmp` into place as `out`, then write its manifest.json, last.

    A manifest.json the stage core wrote into `tmp` is held back and merged under `manifest`.
    `write=False` writes none: the folder is kept but "not done" (e.g. a failed check).
    `out` must pass `replace_problem` for the stage named in tmp's mark (or `kind`); anything else
    is a UserError and nothing moves. tmp's mark gets the inventory of what it holds, which is
    what a later run may replace; the old `out` is renamed aside (marked as ours to remove) first.
    """
    tmp, out = Path(tmp), Path(out)
    if kind is None:
        doc = _read_mark(tmp)
        kind = doc.get("stage") if doc else None
    check_replaceable(out, kind)
    core = tmp / MANIFEST
    core_doc = json.loads(core.read_text()) if core.exists() else {}
    core.unlink(missing_ok=True)
    if out.is_dir():
        for name in KEEP:  # a committed README.md (a regular file) is carried over
            if _top_skipped(out, name) and not os.path.lexists(tmp / name):
                shutil.copy2(out / name, tmp / name)
    mark(tmp, kind, out, inventory(tmp))
    old = None
    if os.path.lexists(out):
        if _top_skipped(out, MANIFEST):
            (out / MANIFEST).unlink()  # invalidate first: a crash below leaves "not done"
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        prev = _read_mark(out)
        mark(out, prev.get("stage") if prev else kind, out, inventory(out), name=old.name)  # clean_stale's, if we die
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
    `out` must pass `replace_problem` for stage `kind` (checked before and at the swap)."""
    out = Path(out)
    check_replaceable(out, kind)
    clean_stale(out)
    tmp = new_tmp(out, kind)
    try:
        yield tmp
        commit(tmp, out, kind=kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
