"""Writing outputs safely: every file appears whole or not at all, sets of outputs appear together, and an
output folder is proven writable before any expensive work."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from src.config import Config, PipelineError


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (named by process, so concurrent writers never
    share one), then rename it into place: readers see the old file or the new one, never half a file,
    and a failed write leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

class Staging:
    """Outputs written as a set: each file or folder goes to a temp path beside its target; ``commit`` then
    moves them all into place, in the order staged (so the one staged last appears last), and ``discard``
    (or leaving the ``with`` block by an error) removes them all, leaving every target as it was."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.discard()

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{path.name}.{os.getpid()}.staged.tmp")

    def file(self, path: str | Path, write: Callable[[Path], Any]) -> Path:
        path = Path(path)
        tmp = self._tmp(path)
        self.pending.append((tmp, path))
        write(tmp)
        return path

    def folder(self, path: str | Path, write: Callable[[Path], Any]) -> Path:
        path = Path(path)
        tmp = self._tmp(path)
        shutil.rmtree(tmp, ignore_errors=True)
        self.pending.append((tmp, path))
        tmp.mkdir()
        write(tmp)
        return path

    def commit(self) -> None:
        for tmp, path in self.pending:
            if tmp.is_dir():
                old = path.with_name(f"{path.name}.{os.getpid()}.old")
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write {what} to {folder}: {exc.strerror or exc}") from None
    return folder

def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so every output says how it was made."""
    return write_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False)))
