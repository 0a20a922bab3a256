"""Writing files and folders so that a failure never leaves anything half-written.

``staged_file(path)``: a context manager that yields a temporary path in the same folder; when the block ends without
an error the file is fsync'ed and renamed over ``path`` (``os.replace`` is atomic within one file system).
``atomic_write(path, data, mode)``: text or bytes written that way. ``staged_directory(path)``: a context
manager that yields a hidden folder beside ``path``; the caller fills it, and only when the block ends without an
error is it renamed to ``path``. On an error the temporary file or folder is removed and an existing ``path`` is
left as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union


def _hidden_sibling(path: Path, kind: str) -> Path:
    """Return an unused hidden name in path's folder (same file system, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk where the platform allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (and Windows) cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def staged_file(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; publish it when the block succeeds.

    On success the temporary file is flushed to disk (fsync) and renamed over ``path``; if the block wrote no file,
    nothing is replaced. On any error (KeyboardInterrupt included) the temporary file is removed and an existing
    ``path`` stays as it was. For writers that need a file name (``torch.save``); text and bytes use atomic_write.
    """
    path = Path(path)
    temporary = _hidden_sibling(path, "tmp")
    try:
        yield temporary
        if temporary.exists():
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes], mode: int = 0o666) -> Path:
    """Write text or bytes to ``path`` through a temporary file and a rename (``staged_file``); return the path.

    The file is never seen half-written: readers get the old content until the rename and the new content after.
    ``mode`` is the permission the file is created with, less the user's umask as for any new file (``0o777``
    for an executable script); it is in place before the rename, so the file is never seen without it.
    """
    path = Path(path)
    if not isinstance(data, (str, bytes, bytearray)):
        raise TypeError(f"atomic_write({path}) takes str or bytes, not {type(data).__name__}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with staged_file(path) as temporary:
        # O_EXCL with an explicit mode: the umask applies (tempfile.mkstemp would force 0600).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        with open(descriptor, "wb") as handle:
            handle.write(payload)
    return path


@contextlib.contextmanager
def staged_directory(path: Union[str, os.PathLike], replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path``; rename it to ``path`` when the block succeeds.

    ``replace=False``: an existing ``path`` raises FileExistsError (before the block runs). ``replace=True``: an
    existing ``path`` is replaced only after the block succeeded; until then it stays intact. On any error
    (KeyboardInterrupt included) the staging folder is removed and the error propagates.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; remove it or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(path, "staging")
    staging.mkdir()  # not tempfile.mkdtemp: that would make the published folder private (0700)
    try:
        yield staging
        _publish(staging, path, replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, path: Path, replace: bool) -> None:
    """Rename staging to path; an existing path is moved aside first and restored if the rename fails."""
    if not path.exists():
        staging.rename(path)
    elif not replace:
        raise FileExistsError(f"{path} appeared while it was being written; nothing was replaced.")
    else:
        previous = _hidden_sibling(path, "previous")
        path.rename(previous)
        try:
            staging.rename(path)
        except BaseException:
            previous.rename(path)
            raise
        if previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            previous.unlink()
    _fsync_folder(path.parent)
