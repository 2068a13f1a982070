"""One owner per run folder.

Training, inference and evaluation write into a run folder (``--output_dir``).
:func:`claim` takes an exclusive lock on ``<run>/.volad.lock`` for as long as the
process works there, so a second process started into the same folder is refused
with a message naming the owner, instead of both overwriting each other's
checkpoints. The lock is an ``fcntl.flock`` lock: the kernel drops it when its
process dies, so the lock of a killed process is stale at once and the next run
takes it over (and says so). While holding it, the temporaries that a killed
writer left behind are removed.

Claims are re-entrant within a process (``volad bench`` or ``volad protocol``
train, map and evaluate in one process), and a folder stays locked until the
last claim in the process is released.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from volad.errors import VoladConfigError
from volad.io import clean_temporaries, ensure_writable

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, a warning instead
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".volad.lock"
_held: dict[Path, list] = {}  # resolved run folder -> [file object, claim count]


def _describe(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"{owner.get('what', 'a volad process')} (pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')})"
    except (json.JSONDecodeError, AttributeError):
        return "another volad process"


def _acquire(folder: Path, what: str) -> None:
    lock_path = folder / LOCK_NAME
    f = open(lock_path, "a+")
    f.seek(0)
    previous = f.read()
    if fcntl is None:  # pragma: no cover
        print(f"volad: warning: no file locking on this system; make sure no other process uses {folder}", flush=True)
    else:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise VoladConfigError(
                f"{folder}: run folder is in use by {_describe(previous)}; wait for it to finish, "
                "or give this command another --output_dir"
            ) from None
    if previous.strip():
        print(f"volad: {folder}: taking over the lock of {_describe(previous)}, which is no longer running", flush=True)
    f.seek(0)
    f.truncate()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    f.write(json.dumps(owner))
    f.flush()
    _held[folder] = [f, 1]
    removed = clean_temporaries(folder)
    if removed:
        size = sum(n for _, n in removed) / 2**20
        print(f"volad: removed {len(removed)} temporary file(s) ({size:.1f} MB) that a killed process left in {folder}", flush=True)


def _release(folder: Path) -> None:
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    f = entry[0]
    del _held[folder]
    f.seek(0)
    f.truncate()  # an empty lock file: nobody owns the folder
    f.flush()
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    f.close()


@contextlib.contextmanager
def claim(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold the run folder ``folder`` for the duration of a ``with`` block.

    The folder is created, checked to be writable (before any work starts), and
    cleaned of temporaries a killed process left.

    Args:
        folder: The run folder.
        what: What the process does there (``"training"``, ``"inference"``,
            ``"evaluation"``), named to anyone refused.

    Raises:
        VoladConfigError: another live process holds the folder, or it cannot be written.
    """
    folder = ensure_writable(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
    else:
        _acquire(folder, what)
    try:
        yield folder
    finally:
        _release(folder)
