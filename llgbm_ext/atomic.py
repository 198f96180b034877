"""Atomic writes: a reader sees the old file or the complete new one, never a half-written one.

Files are written to a temporary name in the same directory and moved into place with
``os.replace``; directories are built beside the target and swapped in with renames. A write that
fails raises an ``OSError`` naming the target (the CLI prints it as one line): on a full file system
always ENOSPC, since safetensors and ``torch.save`` report a full disk in their own error types.
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files get the usual 0o666 & ~umask, not mkstemp's private 0o600
_OS_ERROR = re.compile(r"os error (\d+)")


def _failed_write(error: Exception, path: Path) -> Exception:
    """The error to raise for a failed write of ``path``: an ``OSError`` naming ``path`` where the error's
    errno is known (ENOSPC when the file system is full), else the error itself."""
    if isinstance(error, OSError) and error.filename is not None:
        return error  # already names its file
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (found := _OS_ERROR.search(str(error))):
        code = int(found.group(1))  # safetensors reports "... (os error 28)"
    if code is None and _is_full(path.parent):
        code = errno.ENOSPC  # np.save and torch.save report a full disk without an errno
    return error if code is None else OSError(code, os.strerror(code), str(path))


def _is_full(directory: Path) -> bool:
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def _naming_failures(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        error = _failed_write(e, path)
        if error is e:
            raise
        raise error from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    ``fsync=False`` skips flushing the data to disk before the rename: still never half-written for
    readers, but a power loss may leave an empty file (fine where contents are checksummed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming_failures(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _naming_failures(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~_UMASK)
            if fsync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path`` (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` (old contents removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming_failures(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming_failures(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes private directories
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_once(path: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Create directory ``path`` with ``build(tmpdir)`` unless it already exists; safe across processes.

    Two processes racing both build into their own temporary directory; the first rename wins and
    the loser's copy is discarded, so ``path`` is always complete when it exists.
    """
    path = Path(path)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
