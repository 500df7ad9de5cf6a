"""deploy stage: find `tritonserver`, run it as a context manager, build the multi-rank command.

`TritonServer` starts the server in its own process group bound to 127.0.0.1 by default, logs
to `export/logs/`, waits for /v2/health/ready with a deadline and, on failure, raises `UserError`
with the cause (port in use, a model that fails to load) and the log tail. On exit it sends
SIGTERM, waits, then kills the group; an atexit hook and the parent-death signal make sure no
server outlives its Python process. triton-serving.md §9.

The address is checked (no control characters, IPv4 only) and resolved before anything starts
(`localhost` -> 127.0.0.1); 0.0.0.0 is warned about. The python backend's /dev/shm regions carry
the owner's pid (`grokdeploy<pid>_<port>_`): stop removes its own (a killed or crashed server
leaves them), and each start removes those of owners that died before their stop could run.

Locked down by default (guard.py): Triton's shared-memory, model-repository, logging and trace
APIs need the header `admin-key: <key>`: `server.admin_key`, else a key generated per start and
written 0600 to `<pipeline folder>/tritonserver-<grpc port>.admin-key` (removed by stop). A
watchdog process stops the server's whole group if this process dies without stopping it.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from grok_deploy.errors import UserError
from grok_deploy.serving.triton_binary import TritonBinary, find_tritonserver  # noqa: F401 (deploy's API)
from grok_deploy.serving.guard import (ADMIN_HEADER, GRPC_ADMIN_HEADER, dead, python_stubs, restricted_args,
                                       start_watchdog, stop_watchdog, write_secret)

EXIT_TIMEOUT_S = 10  # --exit-timeout-secs: in-flight requests get this long on SIGTERM
UNLOAD_GRACE_S = 3  # then unloading the models (no request left in flight) gets this long
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "grokdeploy"  # python-backend regions: grokdeploy<owner pid>_<grpc port>_[r<rank>_]<uuid>
BENIGN = ("CudaDriverHelper has not been initialized", "unable to create stream for ensemble")  # CPU hosts


def address_problem(address: str) -> str | None:
    """Why `address` cannot be a server address, from its text alone (no name lookup), or None."""
    import ipaddress

    if not address or any(c.isspace() or not c.isprintable() for c in address):
        return (f"{address!r} is not a host address (empty, or has control characters or spaces); "
                "use 127.0.0.1, 0.0.0.0 or a host name")
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if ip.version == 6:
        return (f"{address} is an IPv6 address; the server's addresses are IPv4 here: use 127.0.0.1 "
                "(this machine) or 0.0.0.0 (every interface)")
    return None


def bind_address(address: str, key: str = "server.address") -> str:
    """The numeric IPv4 address the server binds for `address`: a name like `localhost` resolves
    here, so that Triton and the readiness probe agree on it (Triton given `localhost` may bind
    ::1 while the probe tries 127.0.0.1). UserError for what cannot work."""
    problem = address_problem(address)
    if problem:
        raise UserError(f"{key}: {problem}")
    try:
        infos = socket.getaddrinfo(address, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"{key}: host name {address!r} cannot be resolved to an IPv4 address ({e}); "
                        "use 127.0.0.1 or a name in /etc/hosts") from None
    return infos[0][4][0]


def exposed(address: str) -> bool:
    """True when a server on `address` is reachable from other machines (every interface)."""
    return address in ("0.0.0.0", "")


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm regions whose names start with `prefix`."""
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_shm(prefix: str) -> int:
    """Remove the regions of one server start (the python backend leaves them after a kill); count."""
    n = 0
    for p in shm_regions(prefix):
        try:
            p.unlink()
            n += 1
        except OSError:  # another user's, or already gone
            pass
    return n


def remove_stale_shm() -> int:
    """Remove the regions of earlier server starts whose owning process is dead (killed before its
    stop ran: SIGKILL, OOM); a live owner's regions are left alone. Returns how many."""
    owners = {}
    for p in shm_regions(SHM_PREFIX):
        m = re.match(rf"{SHM_PREFIX}(\d+)_", p.name)
        if m:
            owners.setdefault(int(m.group(1)), []).append(p)
    n = 0
    for pid, paths in owners.items():
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): leave its regions
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        n += remove_shm(f"{SHM_PREFIX}{pid}_")
    return n


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def port_in_use(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


def server_args(repo, address: str, grpc_port: int, http_port: int, metrics_port: int, shm_prefix: str,
                admin_key: str | None = None) -> list[str]:
    return [f"--model-repository={repo}", f"--http-address={address}", f"--grpc-address={address}",
            f"--metrics-address={address}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            *(restricted_args(admin_key) if admin_key else [])]


# ranks > 0 on other nodes: no endpoints at all (only rank 0 serves; triton-serving.md §9)
FOLLOWER_FLAGS = ("--model-control-mode=explicit", "--load-model=tensorrt_llm")
REMOTE_FOLLOWER_FLAGS = ("--allow-http=false", "--allow-grpc=false", "--allow-metrics=false")


def mpirun_command(repo, world_size: int, *, address: str = "127.0.0.1", grpc_port: int = 8001,
                   http_port: int = 8000, metrics_port: int = 8002, binary: str = "tritonserver",
                   extra: tuple = (), shm_prefix: str = "prefix", hostfile=None,
                   admin_key: str | None = None) -> list[str]:
    """Leader mode (triton-serving.md §9): one mpirun app context per rank, the same ports on every
    rank; ranks > 0 load only tensorrt_llm and block in it, rank 0 serves. With an MPI `hostfile`
    (multi-node) the followers also open no HTTP/gRPC/metrics endpoint."""
    from grok_deploy.trtllm.mpi import mpirun_argv

    contexts = []
    for rank in range(world_size):
        follower = (*FOLLOWER_FLAGS, *(REMOTE_FOLLOWER_FLAGS if hostfile else ())) if rank else ()
        args = server_args(repo, address, grpc_port, http_port, metrics_port, f"{shm_prefix}{rank}_", admin_key)
        contexts.append([str(binary), *args,
                         *follower, *extra])
    return mpirun_argv(contexts, hostfile)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG). Linux ties it to
    the parent *thread*: start servers from a thread that lives as long as they should."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort, other platforms
        pass


class TritonServer:
    """`with TritonServer(cfg) as server:` a running, ready server; stopped on exit.

    Values come from the keyword arguments, then the pipeline's `server:` section, then defaults.
    A port of 0 (the default without a pipeline) picks a free one.
    """

    def __init__(self, cfg=None, repo=None, *, address: str | None = None, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, binary: str | None = None,
                 log_dir=None, startup_timeout_s: float | None = None, world_size: int | None = None,
                 admin_key: str | None = None):
        s = cfg.server if cfg is not None else None
        self.repo = Path(repo if repo is not None else cfg.output("triton_repo")).resolve()
        self.address = address or (s.address if s else "127.0.0.1")
        given = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.ports = {k: v if v is not None else (getattr(s, f"{k}_port") if s else 0) for k, v in given.items()}
        self.binary = binary or (s.binary if s else "auto")
        self.log_dir = Path(log_dir if log_dir is not None else
                            (cfg.output("logs") if cfg is not None else self.repo.parent / "export" / "logs"))
        self.timeout = startup_timeout_s or (s.startup_timeout_s if s else 300.0)
        trt = cfg is not None and cfg.engine.backend == "trtllm"
        self.world_size = world_size or (cfg.world_size if trt else 1)
        hw = cfg.hardware if trt else None
        self.hostfile = cfg.resolve(hw.hostfile) if hw is not None and hw.nodes > 1 and hw.hostfile else None
        self.openai_port = s.openai_port if s else None  # Triton's OpenAI frontend: serving/openai_frontend.py
        self.frontend = False                           # set by start: the frontend runs in rank 0's place
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.bind: str | None = None        # the numeric address given to Triton (set by start)
        self.shm_prefix: str | None = None  # its python-backend /dev/shm regions, removed by stop
        # the admin key: given (argument, server.admin_key) or generated by start into admin_key_path
        self.admin_key: str | None = admin_key or (getattr(s, "admin_key", None) if s else None)
        self.key_generated = self.admin_key is None
        self.key_dir = cfg.root if cfg is not None else self.log_dir
        self.admin_key_path: Path | None = None
        self.watchdog: subprocess.Popen | None = None
        self.stub_pids: dict[int, str] = {}  # python stubs seen when ready: pid -> model instance

    # --- addresses ---
    @property
    def host(self) -> str:
        """Where clients on this machine connect (0.0.0.0 is every interface, this one included)."""
        return "127.0.0.1" if exposed(self.address) else (self.bind or self.address)

    @property
    def listening(self) -> str:
        """Who can reach the server, in words (for the start banner)."""
        if exposed(self.address):
            return "every network interface (0.0.0.0): reachable from other machines"
        return f"{self.bind or self.address} only" + (" (this machine)" if (self.bind or "").startswith("127.") else "")

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # --- lifecycle ---
    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
            self.stub_pids = python_stubs(self.proc.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, found: TritonBinary) -> list[str]:
        g, h, m = self.ports["grpc"], self.ports["http"], self.ports["metrics"]
        address = self.bind or self.address
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{g}_"
        if self.world_size > 1:
            if not shutil.which("mpirun"):
                raise UserError(f"world size {self.world_size} needs mpirun on PATH (leader mode)")
            if self.hostfile is not None and not self.hostfile.is_file():
                raise UserError(f"{self.hostfile}: the MPI hostfile (hardware.hostfile) does not exist; write one "
                                f"`host slots=N` line per node")
            extra = (f"--backend-directory={found.backend_dir}",) if found.backend_dir else ()
            return mpirun_command(self.repo, self.world_size, address=address, grpc_port=g, http_port=h,
                                  metrics_port=m, binary=str(found.path), extra=extra, shm_prefix=f"{self.shm_prefix}r",
                                  hostfile=self.hostfile, admin_key=self.admin_key)
        cmd = [str(found.path), *server_args(self.repo, address, g, h, m, self.shm_prefix, self.admin_key),
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
        return cmd + ([f"--backend-directory={found.backend_dir}"] if found.backend_dir else [])

    def start(self) -> None:
        if not (self.repo / "ensemble" / "config.pbtxt").is_file():
            raise UserError(f"{self.repo}: not a model repository (no ensemble/config.pbtxt); run the package stage")
        self.bind = bind_address(self.address)
        if exposed(self.address):
            print(f"warning: server.address {self.address}: the server listens on every network interface and "
                  "is reachable from other machines, without authentication; use 127.0.0.1 to keep it local",
                  file=sys.stderr, flush=True)
        remove_stale_shm()
        for name, port in self.ports.items():
            if port == 0:  # a free port, distinct from the others
                while port == 0 or port in self.ports.values():
                    port = free_port(self.bind)
                self.ports[name] = port
            elif port_in_use(self.bind, port):
                raise UserError(f"{name} port {port} on {self.address} is in use; stop the other server "
                                f"or set server.{name}_port")
        if len(set(self.ports.values())) < 3:
            raise UserError(f"the gRPC, HTTP and metrics ports must differ, got {self.ports}")
        found = find_tritonserver(self.binary)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"tritonserver-{self.ports['grpc']}.log"
        if self.key_generated:
            import secrets

            self.admin_key = secrets.token_urlsafe(24)
        cmd = self.command(found)
        if self.openai_port is not None:
            from grok_deploy.serving.openai_frontend import with_frontend

            if port_in_use(self.bind, self.openai_port):
                raise UserError(f"server.openai_port {self.openai_port} on {self.address} is in use; stop the other "
                                "server or set another port")
            plain = cmd
            cmd = with_frontend(cmd, str(found.path), self.repo, self.bind, self.ports, self.openai_port,
                                note=lambda line: print(line, file=sys.stderr, flush=True))
            self.frontend = cmd is not plain
            if self.frontend:
                from grok_deploy.serving.openai_frontend import UNGUARDED

                print(f"warning: {UNGUARDED}", file=sys.stderr, flush=True)
        if self.key_generated:
            path = self.key_dir / f"tritonserver-{self.ports['grpc']}.admin-key"
            try:
                write_secret(path, self.admin_key)
            except OSError as e:
                raise UserError(f"{path}: cannot write the server's admin key ({e.strerror}); "
                                f"set server.admin_key or make the folder writable") from None
            self.admin_key_path = path
        from grok_deploy.safe_files import open_generated  # a new file renamed in, never over a user's

        try:
            with open_generated(self.log_path, "tritonserver log") as log:
                log.write("$ " + " ".join(cmd).replace(self.admin_key, "<admin key>") + "\n")
                log.flush()
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **found.env},
                                             start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            self._forget_key()
            raise
        atexit.register(self.stop)
        self.watchdog = start_watchdog(self.proc.pid, self.shm_prefix, self.admin_key_path)

    @property
    def admin_headers(self) -> dict:
        """The HTTP header that opens the restricted APIs (`headers=` of tritonclient.http)."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict:
        """The same for gRPC (`headers=` of tritonclient.grpc): Triton prefixes the metadata key."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    def log_tail(self, lines: int = 12) -> str:
        """The error lines of the log, then its last `lines` lines (without the option tables)."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        rows = [r for r in text.splitlines() if r.strip() and not r.lstrip().startswith(("+", "|"))]
        errors = [r[:600] for r in rows if re.match(r"E\d{4} ", r) and not any(b in r for b in BENIGN)][:6]
        return "\n".join(dict.fromkeys(errors + rows[-lines:]))

    def _failure(self, what: str) -> UserError:
        log = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        if re.search(r"address already in use|failed to (start|bind)", log, re.I):
            what += f"; a port is in use ({self.ports})"
        loads = re.findall(r"failed to load '([^']+)'", log)
        if loads:
            what += f"; model(s) failed to load: {', '.join(dict.fromkeys(loads))}"
        tail = "\n".join("  " + line for line in self.log_tail().splitlines())
        return UserError(f"tritonserver {what} (log: {self.log_path}); log tail:\n{tail}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        except OSError:
            return False
        if self.frontend:  # its KServe port can answer before its OpenAI port listens
            from grok_deploy.serving.openai_frontend import is_ready

            return is_ready(self.host, self.openai_port)
        return True

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} while starting")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise self._failure(f"not ready after {self.timeout:.0f} s")
            time.sleep(0.25)

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.proc.wait() if self.proc else 0

    def problem(self) -> str | None:
        """Why the server cannot serve any more, or None: it exited, or a python stub it started
        (one per model instance, seen when it became ready) died: Triton keeps reporting ready
        while every request to that model fails and its in-flight streams hang."""
        code = self.proc.poll() if self.proc else 0
        if code is not None:
            return f"tritonserver exited with code {code}"
        gone = dead(self.stub_pids)
        if gone:
            return "the python stub of model instance " + ", ".join(f"{n} (pid {p})" for p, n in gone) + " died"
        return None

    def watch(self, period_s: float = 0.5) -> str:
        """Block until problem() has something to say; return it."""
        while True:
            problem = self.problem()
            if problem:
                return problem
            time.sleep(period_s)

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 10) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the whole process group (stubs included).
        In-flight requests get Triton's exit timeout; once Triton says none is left and unloads
        the models, the unload gets UNLOAD_GRACE_S: a request Triton itself rejected (wrong
        dtype, batch too big) leaves a model reference behind in 2.51, and that model would stay
        UNLOADING until the full exit timeout."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None:
            self._forget_key()
            return
        if proc.poll() is None:
            start = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
            proc.send_signal(signal.SIGTERM)
            deadline, unloading = time.monotonic() + timeout, None
            while time.monotonic() < deadline and (unloading is None or time.monotonic() < unloading):
                try:
                    proc.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if unloading is None and self._log_since(start, "All models are stopped, unloading models"):
                    unloading = time.monotonic() + UNLOAD_GRACE_S
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): stubs, mpirun ranks
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if self.shm_prefix:  # after a kill or a crash the python backend leaves its regions behind
            remove_shm(self.shm_prefix)
        stop_watchdog(self.watchdog)
        self.watchdog = None
        self._forget_key()

    def _log_since(self, offset: int, text: str) -> bool:
        """Whether `text` is in the server log after byte `offset`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return text.encode() in f.read()
        except (OSError, TypeError):
            return False

    def _forget_key(self) -> None:
        """Remove the generated key's file (the key dies with the server)."""
        if self.key_generated and self.admin_key_path is not None:
            self.admin_key_path.unlink(missing_ok=True)
            self.admin_key_path = None
