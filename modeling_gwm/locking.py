"""Advisory file locks for jobs that share an output directory.

`fcntl.flock` locks belong to an open file description, so the operating system drops them when the process exits
for any reason, SIGKILL included: a crashed job never leaves a stale lock behind, and no lock file needs cleaning.
The lock files live in `<output_dir>/.locks/` (never inside a node's folder, which holds only its outputs) and stay
there: deleting a lock file while another process holds it open would let two processes "hold" the same lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

LOCK_DIR = ".locks"


class NodeBusyError(RuntimeError):
    """Another live process is training the same node into the same output directory."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            pid = handle.read().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the `with` block.

    Non-blocking: raises `BlockingIOError` at once if someone else holds it. The holder's pid is written into the
    file so that the refusal can say who holds it.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


@contextlib.contextmanager
def node_lock(output_dir: str | os.PathLike, node: str) -> Iterator[None]:
    """Claim `<output_dir>/.locks/<node>.lock` for training `node`; `NodeBusyError` if a live process holds it."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    path = os.path.join(output_dir, LOCK_DIR, f"{node}.lock")
    lock = file_lock(path, blocking=False)
    try:
        lock.__enter__()
    except BlockingIOError as err:
        if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise NodeBusyError(f"node {node!r} is already being trained into {output_dir} by {_holder(path)} "
                            f"(lock {path}); wait for that job or use another --output_dir") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def output_lock(output_dir: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Serialise short read-modify-write sections on run-level files (dag.json, final/, the index card)."""
    return file_lock(os.path.join(os.fspath(output_dir), LOCK_DIR, "output.lock"), blocking=True)
