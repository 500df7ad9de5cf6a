"""The one user-facing exception: `main()` prints it as `error: ...` and exits 2; and how a file
system's refusal (no space left, a name too long) becomes one."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# what Rust extensions (tokenizers, safetensors) put in the text of their I/O errors
_RUST_NO_SPACE = tuple(f"(os error {n})" for n in NO_SPACE)


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt input, refused pickle...).

    The message is one line that names the file, key or value and says what to do.
    """


def is_no_space(e: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, as an OSError or in the text of an extension's error."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in NO_SPACE
    return isinstance(e, Exception) and any(s in str(e) for s in _RUST_NO_SPACE)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path) -> Path:
    """The mount point of the file system that holds `path` (or would hold it)."""
    path = _existing(Path(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


def no_space(path, need: int | None, what: str) -> UserError:
    """`path: no space left ...` naming the file system, its free bytes and what `what` needs
    (`need` bytes, or None when unknown: then more than what is free)."""
    where = _existing(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    needs = (f"needs at least {need} bytes ({need / 1e6:.1f} MB)" if need is not None
             else f"needs more than the {free} bytes free")
    return UserError(f"{path}: no space left on the file system mounted at {mount_point(where)} ({free} bytes free, "
                     f"or quota exceeded): {what} {needs}; free space there or write it elsewhere")


@contextmanager
def space_errors(path, need: int | None, what: str) -> Iterator[None]:
    """Within: a full file system (ENOSPC, EDQUOT) becomes `no_space(path, need, what)`. Use it
    outside the block that removes what was half-written."""
    try:
        yield
    except Exception as e:
        if is_no_space(e):
            raise no_space(path, need, what) from None
        raise


def short_path(name, limit: int = 120) -> str:
    """A path for a one-line message: a huge one cut in the middle, with its length."""
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(os.fsencode(text))} bytes)"


def os_error_message(e: OSError) -> str:
    """A file system error that names a file, as the one line `main()` prints (the last resort for
    the errors a command does not name itself: a name too long, a full disk, a folder where a
    file should be)."""
    name = short_path(e.filename)
    if e.errno == errno.ENAMETOOLONG:
        return f"{name}: the path is too long (at most 255 bytes per name, 4095 in all); use a shorter one"
    if e.errno in NO_SPACE:
        return str(no_space(e.filename, None, "writing it"))
    hint = {errno.EISDIR: "a file must be there, not a folder; remove or rename it",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
            errno.EROFS: "the file system is read-only; write elsewhere",
            errno.ELOOP: "a symlink loop; fix or remove the symlink"}.get(e.errno, "check the path")
    return f"{name}: {e.strerror or e}; {hint}"
