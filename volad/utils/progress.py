"""Progress that shows in a terminal and in a log file alike."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Sized, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, *, total: int | None = None, every_s: float = 10.0) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, or with a line every ``every_s`` seconds
    (and at the end) when output goes to a file or pipe, where bars are unreadable.

    Args:
        items: What to iterate.
        desc: What is being done, e.g. ``"evaluate test"``.
        total: Number of items (default ``len(items)``).
        every_s: Seconds between lines when not on a terminal.

    Under DDP only rank 0 shows progress.
    """
    from volad.utils import distributed

    if not distributed.is_main():
        yield from items
        return
    total = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total)
        return
    start = last = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == total:
            last = now
            of = f"/{total}" if total is not None else ""
            print(f"volad: {desc}: {i}{of} ({now - start:.0f} s)", file=sys.stderr, flush=True)
