"""convert's worker pool: rank jobs run in this process or in spawned worker processes that die
with the parent, with progress and failures passed back over one queue.

The pool knows nothing of rank files: `run_ranks(task, jobs, ...)` calls `task(job)` for every job
(convert.convert_rank, a module-level function, so a spawned worker can import it by name) and
`report(nbytes)` is how a task tells its progress, wherever it runs.
"""
from __future__ import annotations

import os
from typing import Callable

from grok_deploy.errors import UserError

_SINK = None  # progress: a multiprocessing queue in workers, a callable in-process
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a worker: get SIGKILL from the kernel when the parent dies (Linux prctl), even by
    SIGKILL, and ignore Ctrl-C (it reaches the whole process group; the parent handles it and
    stops the workers)."""
    import ctypes
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's clean-up still stops the workers
        pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def report(nbytes: int) -> None:
    """Progress from a task: `nbytes` more written."""
    if _SINK is None:
        return
    _SINK.put(("bytes", nbytes)) if hasattr(_SINK, "put") else _SINK(nbytes)


def _worker(task: Callable[[dict], dict], jobs: list[dict], queue, parent: int) -> None:
    """A worker process: its ranks one after the other; results and failures go to `queue`."""
    global _SINK
    die_with_parent(parent)
    _SINK = queue
    for job in jobs:
        try:
            queue.put(("done", job["rank"], task(job)))
        except UserError as e:
            queue.put(("user", job["rank"], str(e)))
            return
        except BaseException:
            import traceback
            queue.put(("bug", job["rank"], traceback.format_exc()))
            return


def run_ranks(task: Callable[[dict], dict], jobs: list[dict], workers: int, on_bytes) -> list[dict]:
    """`task(job)` for every job, results in job order; `workers` > 1: in that many processes, which
    die with this one (parent-death signal) and are killed here on any failure, Ctrl-C or SIGTERM."""
    global _SINK
    if workers <= 1 or len(jobs) == 1:
        _SINK = on_bytes
        try:
            return [task(j) for j in jobs]
        finally:
            _SINK = None
    import multiprocessing as mp
    from queue import Empty

    ctx = mp.get_context("spawn")  # no fork of a parent holding open files and threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(task, jobs[i::workers], queue, os.getpid()), daemon=True)
             for i in range(workers)]
    results: dict[int, dict] = {}
    try:
        for p in procs:
            p.start()
        while len(results) < len(jobs):
            try:
                kind, *rest = queue.get(timeout=0.1)
            except Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:  # e.g. the kernel's OOM killer: a clear error, nothing kept
                    code = dead[0].exitcode
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    raise UserError(f"convert: a worker process (pid {dead[0].pid}) {how}"
                                    f"{' (out of memory?)' if code == -9 else ''}; nothing was kept; "
                                    "run again, with fewer --workers if memory is short")
                continue
            if kind == "bytes":
                on_bytes(rest[0])
            elif kind == "done":
                results[rest[0]] = rest[1]
            elif kind == "user":
                raise UserError(rest[1])
            else:
                raise RuntimeError(f"convert worker for rank {rest[0]} failed:\n{rest[1]}")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join()
        queue.close()
    return [results[j["rank"]] for j in jobs]
