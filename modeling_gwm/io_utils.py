"""Atomic writes: a file is either its old self or its complete new self, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide outputs from a shared group


def _temp_file(path: str) -> tuple[int, str]:
    """A temporary file next to `path` (same file system, so the final rename is atomic), with ordinary permissions."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[tuple[int, str]]:
    """Yield (open descriptor, name) of a temporary file next to `path`; once the block has written it, it is renamed
    over `path` in one step (and the folder synced); if the block fails, it is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_file(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _replacing(str(path)) as (fd, _), os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    with _replacing(str(path)) as (fd, tmp):
        os.close(fd)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _FILE_MODE)  # safetensors writes a new 0600 file in place of ours
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())


def atomic_move_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Publish a file another library wrote (e.g. PEFT's save_pretrained into a staging folder): flushed to disk,
    ordinary permissions, then renamed over `target` in one step."""
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(source, _FILE_MODE)
    os.replace(source, target)
    _fsync_dir(os.path.dirname(os.path.abspath(target)))


def atomic_replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a fully written `staging` folder to `target` (replacing an older one) with renames only."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(str(target.parent))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a file that is not JSON or holds no object is a ValueError naming the file."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}; restore or delete it")
    return data


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """safetensors reports I/O failures (disk full, EFBIG) as its own error type: make them one-line OSErrors."""
    try:
        yield
    except SafetensorError as err:
        raise OSError(f"could not write {what}: {str(err).splitlines()[0]}") from None
