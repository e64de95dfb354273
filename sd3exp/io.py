"""Atomic writes: a reader never sees half a file, nor half a folder (atomic_dir)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Union

from sd3exp.errors import DiskFullError, no_space_message

_TEMPORARY = re.compile(r"\..+\.(\d+)\.[^.]+\.tmp")  # write_bytes' temporary file: .<name>.<pid>.<number>.tmp
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_TEMPORARY_NUMBERS = itertools.count()  # with the pid, a name no other writer of this folder uses at once


def user_cache() -> Path:
    """sd3exp's folder in the user's cache: $XDG_CACHE_HOME/sd3exp, ~/.cache/sd3exp where it is unset or empty."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd3exp"


def _new_temporary(path: Path) -> tuple[int, str]:
    """A new file beside `path` (its folder made when missing), permissions as open() gives (0o666 less
    the umask): its descriptor and name."""
    made = False
    while True:
        tmp = os.path.join(path.parent, f".{path.name}.{os.getpid()}.{next(_TEMPORARY_NUMBERS):x}.tmp")
        try:
            return os.open(tmp, _NEW_FILE, 0o666), tmp
        except FileExistsError:  # left by a killed process that had this pid: take the next number
            continue
        except FileNotFoundError:  # the folder is missing (another writer may be making it right now)
            if made:
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
            made = True


def _disk_full(path: Path) -> DiskFullError:
    kept = "its earlier version is unchanged" if path.exists() else "nothing was written"
    return DiskFullError(f"{no_space_message(path)}; writing {path.name} failed, {kept}")


def write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    """Write via a temporary file in the same folder and rename it into place; fsynced before the
    rename unless `sync` is false (the caller makes it durable later: `synced`). DiskFullError when
    the disk has no room for the bytes or no inode for the file."""
    try:
        fd, tmp = _new_temporary(path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path) from err
        raise
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise _disk_full(path) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # a delayed allocation can find the disk full only now
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"{no_space_message(path)}; {path.name} could not be written to the disk") from err
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def background(threads: int, name: str) -> Iterator[Callable[..., Future]]:
    """A `submit(fn, *args)` running work on up to `threads` threads while the block runs; when the block
    ends all of it has finished, and the first error it raised is raised (after the block's own)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    futures: List[Future] = []

    def submit(fn: Callable[..., Any], *args: Any) -> Future:
        futures.append(pool.submit(fn, *args))
        return futures[-1]

    try:
        yield submit
        for done in futures:
            done.result()
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def synced(paths: Sequence[Path], threads: int = 8) -> Iterator[None]:
    """The files made durable (fsync, several at a time) in background threads while the block runs:
    on the disk, or the first error raised, when it ends. For files written with sync=False whose
    names are recorded only after the block (cells.json after the grid is drawn)."""
    with background(threads, "sd3exp-fsync") as submit:
        for path in paths:
            submit(_fsync, path)
        yield


def fsync_all(paths: Sequence[Path]) -> None:
    """The files made durable, several at a time."""
    with synced(paths):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file a write_bytes left when its process was killed
    (`.<name>.<pid>.<number>.tmp` of a pid that is gone)."""
    m = _TEMPORARY.fullmatch(path.name)
    return m is not None and not _alive(int(m.group(1)))


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Remove the temporary files that writes in `folder` left when their process was killed; returns them."""
    stale = [tmp for tmp in (folder.glob(".*.tmp") if folder.is_dir() else []) if stale_temporary(tmp)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def write_if_changed(path: Path, content: Union[str, bytes]) -> bool:
    """Write atomically unless the file already has exactly this content (its mtime stays)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.is_file() and path.read_bytes() == data:
        return False
    write_bytes(path, data)
    return True


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    write_text(path, dumps_json(data))


def read_json(path: Union[str, Path]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def side(dest: Path, tag: str) -> Path:
    """`.<name>.<tag>` beside `dest`: where atomic_dir builds (`building`) and what it replaces (`old`)."""
    return dest.with_name(f".{dest.name}.{tag}")


def recover_dir(dest: Path) -> None:
    """Undo what a replacing atomic_dir cut short by a kill left: `.old` back in place when `dest` is
    missing, a half-built folder removed."""
    old, build = side(dest, "old"), side(dest, "building")
    if old.exists() and not dest.exists():
        os.rename(old, dest)
    for leftover in (old, build):
        if leftover.exists():
            shutil.rmtree(leftover)


@contextlib.contextmanager
def atomic_dir(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty folder beside `dest` to build in; when the block ends without an error it is
    renamed to `dest`, else removed. replace=True (one builder at a time): `.<name>.building`, and an
    existing `dest` is moved to `.<name>.old` first and removed after (recover_dir undoes a kill in
    between). replace=False (builders may race): a uniquely named folder, and a `dest` that another
    builder put in place first is kept, this one dropped."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        recover_dir(dest)
        build = side(dest, "building")
        build.mkdir()
    else:
        build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".building", dir=dest.parent))
    try:
        yield build
        if replace and dest.exists():
            os.rename(dest, side(dest, "old"))
        try:
            os.rename(build, dest)
        except OSError:
            if replace or not dest.is_dir():  # else another builder's folder came first: it stays
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if replace:
        shutil.rmtree(side(dest, "old"), ignore_errors=True)
