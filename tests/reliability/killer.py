"""Run a grok-deploy command and SIGKILL it at its N-th write point (a test harness, not shipped).

    python killer.py N COUNT_FILE grok-deploy-args...

Points are the file-system writes of this process (open for writing, mkdir, rename, replace,
unlink, rmdir) and the streaming steps of the stages (each RankWriter.write, each progress
update). N = 0 kills nothing and writes the number of points seen to COUNT_FILE at exit, so a
test can spread its kill points over the whole command. Worker processes are not hooked (they
re-import this file as __mp_main__, below the guard).
"""
from __future__ import annotations

import builtins
import os
import signal
import sys


def install(kill_at: int, counter: list[int]) -> None:
    def point() -> None:
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn, writes=lambda *a, **k: True):
        def hooked(*a, **k):
            if writes(*a, **k):
                point()
            return fn(*a, **k)
        return hooked

    def writing(file, mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    builtins.open = wrap(builtins.open, writing)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    from grok_deploy import progress
    from grok_deploy.trtllm import safetensors_writer

    safetensors_writer.RankWriter.write = wrap(safetensors_writer.RankWriter.write)
    progress.Progress.update = wrap(progress.Progress.update)


if __name__ == "__main__":
    kill_at, count_file, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    counter = [0]
    install(kill_at, counter)
    from grok_deploy.cli import main

    code = main(argv)
    with open(count_file, "w") as f:
        f.write(str(counter[0]))
    sys.exit(code)
