"""Files written whole or not at all: an interrupted write leaves the previous file in place."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

logger = logging.getLogger(__name__)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it over.

    An interruption at any point leaves the previous file (or no file) in place. The file
    keeps the mode of the one it replaces; a new file gets the umask's default mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strict JSON (NaN and infinity are errors), atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


LOCK_NAME = ".lock"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold ``directory`` (created if missing) for this process for the block.

    A second holder fails at once with a ValueError naming the process that holds it, so
    two runs never write into one directory; with ``wait`` it waits for the holder instead,
    saying so in the log. A directory that cannot be made or written is a ValueError
    before any work starts. The lock ends with the process, however it ends.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, _new_file_mode())
    except OSError as exc:
        raise ValueError(f"cannot write into {directory} ({exc.strerror}); choose a writable "
                         f"directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise ValueError(f"{directory} is in use by another run (process {holder}); "
                                 f"wait for it or choose another directory") from None
            logger.info("waiting for process %s, which holds %s", holder, directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
