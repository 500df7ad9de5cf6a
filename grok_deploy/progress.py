"""One progress bar for long steps: bytes (with rate and ETA) and a count of tensors.

    with Progress(total_bytes, "convert rank 0", total_items=len(names)) as bar:
        for name in names:
            ...
            bar.update(array.nbytes, name=name)

or `for t in track(tensors, "write", total_bytes=n)`. Bars go to stderr and switch themselves off
when stderr is not a terminal or GROK_DEPLOY_PROGRESS=0.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    if os.environ.get("GROK_DEPLOY_PROGRESS", "") in ("0", "false", "no"):
        return False
    return sys.stderr.isatty() or os.environ.get("GROK_DEPLOY_PROGRESS", "") in ("1", "true", "yes")


class Progress:
    """A tqdm bar counting bytes, with `done/total tensors` and the current name as postfix."""

    def __init__(self, total_bytes: int | None, desc: str, total_items: int | None = None,
                 item: str = "tensors", show: bool | None = None):
        from tqdm import tqdm

        self.items, self.n_bytes, self.total_items, self.item = 0, 0, total_items, item
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        dynamic_ncols=True, file=sys.stderr, disable=not (enabled() if show is None else show))

    def update(self, nbytes: int, items: int = 1, name: str | None = None) -> None:
        self.items += items
        self.n_bytes += nbytes
        total = f"/{self.total_items}" if self.total_items else ""
        self.bar.set_postfix_str(f"{self.items}{total} {self.item}" + (f" {name}" if name else ""), refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total_bytes: int | None = None, total_items: int | None = None,
          size: Callable[[T], int] = lambda x: int(getattr(x, "nbytes", 0)), show: bool | None = None) -> Iterator[T]:
    """Yield `items`, advancing a Progress by `size(item)` bytes after each one."""
    if total_items is None and hasattr(items, "__len__"):
        total_items = len(items)  # type: ignore[arg-type]
    with Progress(total_bytes, desc, total_items, show=show) as bar:
        for x in items:
            yield x
            bar.update(size(x))
