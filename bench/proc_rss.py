"""Memory of a process tree, for the benchmarks here: read from /proc, no extra dependency."""
from __future__ import annotations

import os


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) of VmRSS over pid and its descendants, in bytes."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total = biggest = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    total, biggest = total + rss, max(biggest, rss)
        except OSError:
            pass
    return total, biggest
