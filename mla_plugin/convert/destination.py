"""A converter's output folder, written atomically: DST appears whole or not at all.

    @atomic_destination
    def convert_x(src, dst, ...):      # the body writes into ``dst`` as if it were DST

The decorator checks DST (new, or an empty folder), takes a lock beside it, hands the
converter a staging folder beside DST instead (created by the converter when it starts
writing, after its checks), and when the converter returns, checks what was written
(every safetensors header readable and covering its file, config.json, the index's
shards) and renames the staging folder onto DST. On any failure (a bad input, an
exception mid-write, Ctrl-C) the staging folder, the lock file and any parent folders it
created are removed. A run killed outright (SIGKILL, power loss) leaves DST untouched;
its leftovers beside DST are removed by the next conversion into DST, which can tell
they are stale because it holds the lock.

Beside DST = ``/models/out``:

    /models/.out.mla-plugin-lock       flock'ed while a conversion into /models/out runs
    /models/.out.mla-plugin-partial    the staging folder

A second conversion into the same DST while one runs fails at once with one line
(``ConversionError``); one that starts after the first finished finds DST not empty. The
rename itself refuses a DST that something else filled meanwhile (rename(2) replaces
only an empty folder).
"""

import errno
import fcntl
import functools
import inspect
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mla_plugin.convert.conversion_error import ConversionError
from mla_plugin.convert.source import read_source
from mla_plugin.errors import MLAPluginInputError

LOCK_SUFFIX = ".mla-plugin-lock"
STAGING_SUFFIX = ".mla-plugin-partial"


def check_destination(dst: Path) -> None:
    """DST must be new, or an empty folder."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file; give a new or empty folder")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; give a new or empty folder")


def lock_path(dst) -> Path:
    target = Path(dst).resolve()
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def staging_path(dst) -> Path:
    target = Path(dst).resolve()
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def atomic_destination(convert):
    """Make ``convert(src, dst, ...)`` write DST atomically (see the module docstring): the
    wrapped function receives the staging folder as ``dst``."""
    signature = inspect.signature(convert)

    @functools.wraps(convert)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        with staged_destination(Path(bound.arguments["dst"])) as staging:
            bound.arguments["dst"] = staging
            return convert(*bound.args, **bound.kwargs)

    return wrapper


@contextmanager
def staged_destination(dst: Path) -> Iterator[Path]:
    """Yield the staging folder for DST (not created yet); on a normal exit check it and
    rename it onto DST, on any exception remove it. Holds DST's lock throughout."""
    check_destination(dst)
    target = dst.resolve()
    created = _make_parents(target.parent, dst)
    try:
        with _destination_lock(target, dst):
            check_destination(dst)  # again, under the lock: a conversion that held it may have finished
            staging = staging_path(target)
            _remove(staging)  # a killed run's leftovers (we hold the lock, so no run is writing it)
            try:
                yield staging
                _check_written(staging, dst)
                _sync_folder(staging)
                _rename_into_place(staging, target, dst)
            except BaseException:
                _remove(staging)
                raise
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _make_parents(parent: Path, dst: Path) -> list[Path]:
    """Create DST's missing parent folders; returns those this call created, outermost first."""
    missing = []
    folder = parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            pass  # made meanwhile by another conversion: not ours to remove
        except OSError as err:
            for made in reversed(created):
                made.rmdir()
            raise ConversionError(f"cannot create {folder} for {dst}: {err.strerror}; give a folder you can "
                                  "write to") from None
    return created


@contextmanager
def _destination_lock(target: Path, dst: Path) -> Iterator[None]:
    """An exclusive flock on the lock file beside DST; another holder means another
    conversion into DST is running. The kernel drops the lock when its process dies."""
    path = lock_path(target)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConversionError(f"cannot write beside {dst} ({path}: {err.strerror}); give a folder you can "
                                  "write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConversionError(f"another conversion is writing {dst} now (it holds {path}); wait for it to "
                                  "finish or give another DST") from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its holder finished and removed it between our open and flock: take the new one
    else:
        raise ConversionError(f"could not take the lock {path} for {dst}; other conversions keep replacing it")
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _check_written(staging: Path, dst: Path) -> None:
    """The staged checkpoint reads back as a checkpoint: config.json, every safetensors
    header readable and covering its file, every shard the index names present."""
    if not staging.is_dir():
        raise ConversionError(f"the conversion into {dst} wrote nothing")
    try:
        source = read_source(staging)
        source.tensors  # noqa: B018  (reads and checks every header)
    except MLAPluginInputError as err:
        raise ConversionError(f"the converted checkpoint failed its final check, so {dst} was not written: "
                              f"{err}") from None


def _sync_folder(folder: Path) -> None:
    """Flush every written file, and the folder, to disk before the rename makes them DST."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_directory(folder)


def _sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_into_place(staging: Path, target: Path, dst: Path) -> None:
    """rename(2): atomic; replaces DST only when it is missing or an empty folder."""
    try:
        os.rename(staging, target)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise ConversionError(f"{dst} was filled by something else during the conversion; it was left as "
                                  "it is: give a new or empty folder") from None
        raise ConversionError(f"cannot rename the converted checkpoint onto {dst}: {err.strerror}; give a new "
                              "folder on the same file system as its parent") from None
    _sync_directory(target.parent)
