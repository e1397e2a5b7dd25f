"""Writing outputs safely: every file appears whole or not at all, sets of outputs appear together, and an
output folder is proven writable before any expensive work."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from src.config import Config, PipelineError

# Temp names of this module, all ``<name>.<pid>[.staged|.old].tmp``: the pid says whose they are.
TEMP_NAME = re.compile(r"^.+\.(?P<pid>\d+)(?:\.staged|\.old)?\.tmp$")
# Below this much free space a failed write is a full disk, whatever the writer raised (torch reports one as
# "RuntimeError: ... unexpected pos", with no errno).
FULL_DISK_BYTES = 1 << 20


class WriteError(PipelineError):
    """A file that could not be written (full disk, permissions, a folder in its place, an object that does not
    serialise): one line naming the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path}: {reason}")


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps it at or above 1 (``1.5 MiB``)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder: str | Path) -> int | None:
    """Space left for this user in the file system holding ``folder`` (None when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failure(path: str | Path, exc: BaseException) -> WriteError:
    """The :class:`WriteError` for ``exc``, raised while writing ``path``: the OS's reason, or a full disk when
    next to no space is left (writers such as torch.save hide the errno), or the writer's own error (an object
    that does not pickle)."""
    if isinstance(exc, OSError) and exc.strerror:
        return WriteError(path, exc.strerror)
    free = free_bytes(Path(path).parent)
    if free is not None and free < FULL_DISK_BYTES:
        return WriteError(path, f"No space left on device ({format_bytes(free)} free)")
    detail = (str(exc).strip().splitlines() or [""])[0]
    return WriteError(path, f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (named by process, so concurrent writers never
    share one), then rename it into place: readers see the old file or the new one, never half a file,
    and a failed write leaves no temp file behind. Any failure of the write (a full disk, torch's
    serialisation error, an object that does not pickle) is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except PipelineError:
        raise
    except Exception as exc:
        raise write_failure(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path

def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """``target`` becomes a copy of ``source`` without writing its bytes again: a hard link where the file system
    allows (as timm's CheckpointSaver links its best checkpoint), else a file copy; atomic either way."""

    def link(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    return write_atomic(target, link)


class Staging:
    """Outputs written as a set: each file or folder goes to a temp path beside its target; ``commit`` then
    moves them all into place, in the order staged (so the one staged last appears last), after checking that
    each target can be replaced, and ``discard`` (or leaving the ``with`` block by an error) removes them all,
    leaving every target as it was. A failed write is a :class:`WriteError` naming the target."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.discard()

    def _tmp(self, path: Path) -> Path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(path, exc) from exc
        return path.with_name(f"{path.name}.{os.getpid()}.staged.tmp")

    def _write(self, path: Path, tmp: Path, write: Callable[[Path], Any]) -> None:
        try:
            write(tmp)
        except PipelineError:
            raise
        except Exception as exc:  # as write_atomic: any failure names the target, not the temp
            raise write_failure(path, exc) from exc

    def file(self, path: str | Path, write: Callable[[Path], Any]) -> Path:
        path = Path(path)
        tmp = self._tmp(path)
        self.pending.append((tmp, path))
        self._write(path, tmp, write)
        return path

    def folder(self, path: str | Path, write: Callable[[Path], Any]) -> Path:
        path = Path(path)
        tmp = self._tmp(path)
        shutil.rmtree(tmp, ignore_errors=True)
        self.pending.append((tmp, path))
        tmp.mkdir()
        self._write(path, tmp, write)
        return path

    def commit(self) -> None:
        # Every target is checked before the first rename: a file staged for a path that is now a folder
        # would otherwise fail half-way, with the outputs before it already replaced.
        for tmp, path in self.pending:
            if path.is_dir() and not tmp.is_dir():
                raise WriteError(path, "it is a folder; expected a file")
        for tmp, path in self.pending:
            try:
                if tmp.is_dir():
                    old = path.with_name(f"{path.name}.{os.getpid()}.old.tmp")
                    if path.exists():
                        os.replace(path, old)
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, path)
            except OSError as exc:
                raise write_failure(path, exc) from exc
        self.pending = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self.pending = []

def ensure_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any expensive work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"cannot write {what} to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write {what} to {folder}: {exc.strerror or exc}") from None
    return folder


def ensure_writable_file(path: str | Path, key: str) -> Path:
    """Prove that the file ``path`` (named by config key ``key``) can be written, before any expensive work: it
    is not a folder, and its folder is writable."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{key}={path} is a folder: name the file to write (such as {path / 'submission.csv'})")
    ensure_writable(path.parent, f"{key}={path}")
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it may be writing)."""
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files and staging folders in ``folder`` (``<name>.<pid>[.staged|.old].tmp``, of
    :func:`write_atomic`, :class:`Staging` and :func:`ensure_writable`) whose process is gone: what a kill -9 or
    a power cut left behind. A live process's temps (this one's too) are never touched. Returns those removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = TEMP_NAME.match(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed

def save_config(cfg: Config, path: str | Path, comment: str | None = None) -> Path:
    """Write the resolved config as YAML (atomically), so every output says how it was made; ``comment``: a
    ``#`` line above it (what was resolved and why: a YAML comment, so the file loads as the config it is)."""
    header = f"# {comment}\n" if comment else ""
    return write_atomic(path, lambda tmp: tmp.write_text(header + yaml.safe_dump(cfg.model_dump(), sort_keys=False)))


@contextmanager
def folder_lock(folder: Path, lock_name: str, holder: str, advice: str) -> Iterator[None]:
    """Hold ``folder`` for this process (an OS file lock, ``flock``, on ``folder/lock_name``, so it is released when
    the process ends, by a crash or kill -9 too): a second holder is refused with one error naming the pid of
    the ``holder`` that has it, and ``advice``. Temp files of atomic writes a killed process left there are
    removed once the lock is held (a live process's are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / lock_name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise PipelineError(f"{folder} is in use by another {holder} (pid {pid}); {advice}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        remove_stale_temps(folder)
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
