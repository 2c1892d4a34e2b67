"""One lock per entry key, so two processes never build the same entry (flock: released by the OS on kill)."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _held(path: Path, wait: bool, on_wait: Callable[[], None] | None = None) -> Iterator[int | None]:
    """The lock file's descriptor while this process holds the lock, or None when it is taken and
    `wait` is false. Waiting calls `on_wait` first (so the caller can say what it waits for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield None
                return
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    with _held(path, wait=True, on_wait=on_wait) as fd:
        assert fd is not None  # a waiting lock is always taken
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking at the file
        yield


@contextmanager
def lock_if_free(path: Path) -> Iterator[bool]:
    """Take the lock only if nobody holds it; yields whether it was taken (and holds it meanwhile)."""
    with _held(path, wait=False) as fd:
        yield fd is not None


def is_locked(path: Path) -> bool:
    """Whether some live process holds the lock at `path` (a killed holder's lock is free again)."""
    if not path.exists():
        return False
    with lock_if_free(path) as free:
        return not free
