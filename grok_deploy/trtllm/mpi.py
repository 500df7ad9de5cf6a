"""MPI across nodes: the mpirun command line (one app context per rank, an MPI hostfile), and
check-shards launched by it, so the multi-node command is exercised with a CPU payload.

The serving launch (triton-serving.md §9) and `grok-deploy check-shards` use the same layout:
world = tp x pp ranks, rank r in app context r; Open MPI fills the hostfile's slots in order, so
ranks 0..S-1 land on the first host (the leader, which serves), the next S on the second, ...

    python -m grok_deploy.trtllm.mpi JOB.json   # one rank of check-shards, rank from the MPI env
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from grok_deploy.errors import UserError

RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def mpirun_argv(contexts: list[list[str]], hostfile: str | Path | None = None, mpirun: str = "mpirun",
                extra: tuple[str, ...] = ()) -> list[str]:
    """`mpirun --allow-run-as-root [--hostfile H] -n 1 CMD0 : -n 1 CMD1 : ...`, one context per rank."""
    argv = [mpirun, "--allow-run-as-root", *(["--hostfile", str(hostfile)] if hostfile else []), *extra]
    for rank, cmd in enumerate(contexts):
        argv += ([":"] if rank else []) + ["-n", "1", *cmd]
    return argv


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per line of an Open MPI hostfile (`host slots=N`, comments with #)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the MPI hostfile ({e.strerror}); write one `host slots=N` line "
                        "per node") from None
    hosts = []
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = [w for w in words[1:] if w.startswith("slots=")]
        try:
            count = int(slots[0].split("=", 1)[1]) if slots else 1
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"{path} line {n}: {line.strip()!r}: slots must be a positive integer")
        hosts.append((words[0], count))
    if not hosts:
        raise UserError(f"{path}: no hosts; write one `host slots=N` line per node")
    return hosts


def mpirun_launcher(hostfile: str | Path, mpirun: str = "mpirun", extra: tuple[str, ...] = ()):
    """A check_shards launcher: runs the ranks under mpirun with `hostfile` (the gloo rendezvous is
    on the hostfile's first host), instead of local processes."""
    def launch(job: dict, world: int, timeout: float) -> None:
        hosts = read_hostfile(hostfile)
        if sum(n for _, n in hosts) < world:
            raise UserError(f"{hostfile}: {sum(n for _, n in hosts)} slots for {world} ranks; add slots or hosts")
        job = {**job, "master_addr": hosts[0][0]}
        job_file = Path(job["results"]) / "job.json"
        job_file.write_text(json.dumps(job))
        payload = [sys.executable, "-m", __name__, str(job_file)]
        argv = mpirun_argv([payload] * world, hostfile, mpirun, extra)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"check-shards under mpirun did not finish within {timeout:.0f} s: "
                               f"{shlex.join(argv)}") from None
        if proc.returncode:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise RuntimeError(f"mpirun exited {proc.returncode}: {shlex.join(argv)}: {tail}")
    return launch


def rank_from_env() -> int:
    for key in RANK_ENV:
        if key in os.environ:
            return int(os.environ[key])
    raise UserError(f"no MPI rank in the environment ({', '.join(RANK_ENV)}); start this under mpirun")


def main(argv: list[str]) -> int:
    from grok_deploy.trtllm.check_stream import _rank_layers_main

    job = json.loads(Path(argv[0]).read_text())
    _rank_layers_main(rank_from_env(), job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
