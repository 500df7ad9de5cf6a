"""The server's guards, beside deploy.py: the admin key that locks Triton's admin APIs, and the
watchdog that stops a server whose owner died.

Locked down by default: the shared-memory, model-repository, logging and trace APIs (RESTRICTED)
answer only requests that carry the header `admin-key: <key>` (Triton's --grpc-restricted-protocol /
--http-restricted-api, whose syntax is `<api>,<api>:<header>=<value>`: Triton server
docs/customization_guide/inference_protocols.md); inference, health, metadata, model config and
statistics stay open. So no client can register the python backend's /dev/shm IPC regions as its
own shared memory, read the repository index or change the log level.

The watchdog (`python -c WATCHDOG`, its own session) reads a pipe from the owner: when the owner
dies without stopping the server (SIGKILL, OOM), the pipe closes and the watchdog stops the
server's process group (SIGTERM, then SIGKILL after KILL_GRACE_S: tritonserver and every python
stub) and removes its /dev/shm regions and key file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ADMIN_HEADER = "admin-key"  # the HTTP header that carries the admin key
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # gRPC: Triton prefixes the metadata key
RESTRICTED = ("shared-memory", "model-repository", "logging", "trace")  # need the admin key
ADMIN_KEY_RE = r"[A-Za-z0-9._~-]{16,256}"  # a header value Triton's flag syntax cannot misread
KILL_GRACE_S = 3  # the watchdog's SIGTERM -> SIGKILL wait once its owner is dead


def restricted_args(admin_key: str) -> list[str]:
    """Triton's flags that put the RESTRICTED APIs behind `ADMIN_HEADER: admin_key`
    (`<api>,<api>:<header>=<value>`, docs/customization_guide/inference_protocols.md)."""
    group = f"{','.join(RESTRICTED)}:{ADMIN_HEADER}={admin_key}"
    return [f"--grpc-restricted-protocol={group}", f"--http-restricted-api={group}"]


def write_secret(path: Path, text: str) -> None:
    """`text` into `path`, mode 0600 from its creation: a fresh temp file (O_EXCL, no symlink
    followed) renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# The watchdog (python -c): argv = pgid, shm prefix, key file or "". It reads its stdin (a pipe
# from the owner) until EOF: "q" first = the owner stopped the server itself; a bare EOF = the owner
# died: stop the group, then remove its regions and key file.
WATCHDOG = """
import os, signal, sys, time
pgid, prefix, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.stdin.buffer.read(1) == b"q":
    sys.exit(0)
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
if alive():
    os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + float(sys.argv[4])
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
    if alive():
        os.killpg(pgid, signal.SIGKILL)
for name in os.listdir("/dev/shm") if prefix else []:
    if name.startswith(prefix):
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
if key:
    try:
        os.unlink(key)
    except OSError:
        pass
"""


def start_watchdog(pgid: int, shm_prefix: str | None, key_file: Path | None) -> subprocess.Popen:
    """The process that stops process group `pgid` if this process dies before stop_watchdog."""
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(pgid), shm_prefix or "",
                             str(key_file) if key_file else "", str(KILL_GRACE_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_watchdog(dog: subprocess.Popen | None) -> None:
    """Tell the watchdog the server was stopped by its owner; it exits without touching anything."""
    if dog is None:
        return
    try:
        dog.stdin.write(b"q")
        dog.stdin.close()
    except OSError:  # it is gone already
        pass
    try:
        dog.wait(5)
    except subprocess.TimeoutExpired:
        dog.kill()
        dog.wait()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of `pid` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
    return fields[0], int(fields[2])


def python_stubs(pgid: int) -> dict[int, str]:
    """{pid: model instance} of the python backend stubs in process group `pgid` (the stub's
    argv names the instance, e.g. `tensorrt_llm_0_0`)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None or st[1] != pgid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub"):
            out[int(entry.name)] = stub_instance(argv)
    return out


def stub_instance(argv: list[bytes]) -> str:
    """The model instance a stub serves: its model.py's folder name, version and instance are in
    argv (`.../<model>/1/model.py ... <model>_<group>_<index> ...`)."""
    names = [a.decode(errors="replace") for a in argv]
    model = Path(names[1]).parent.parent.name if len(names) > 1 else "?"
    return next((n for n in names[2:] if n.startswith(f"{model}_")), model)


def dead(pids: dict[int, str]) -> list[tuple[int, str]]:
    """The (pid, instance) of `pids` that are gone or zombies (died, not yet reaped)."""
    out = []
    for pid, name in pids.items():
        st = _stat(pid)
        if st is None or st[0] in "ZX":
            out.append((pid, name))
    return out
