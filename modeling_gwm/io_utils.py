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


# ---------------------------------------------------------------------------------------------------- output guards
# A folder holding one of these is a trained adapter (adapter_config.json, adapter_model.safetensors), a finished
# node (COMPLETE) or a training run (dag.json): nothing but the trainer writes there.
PROTECTED_MARKERS = ("dag.json", "COMPLETE", "adapter_config.json", "adapter_model.safetensors")


class OutputPathError(ValueError):
    """An output path that would overwrite an input, write into an adapter or run folder, or cannot be written."""


def _real(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(str(path))))


def _same(a: str, b: str) -> bool:
    """Same file or folder: equal real paths, or one inode (hard links, case-insensitive file systems)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it: some folder above `path`'s real path is `folder`'s inode (so symlinks,
    `./`, `..` and the case of names on a case-insensitive file system do not matter); `path` need not exist."""
    try:
        target = os.stat(folder)
    except OSError:
        return False
    current = _real(path)
    while True:
        try:
            found = os.stat(current)
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                return True
        except OSError:
            pass
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def protected_folder(path: str | os.PathLike) -> str | None:
    """The nearest adapter, node or run folder at or above `path`'s folder (real paths), or None."""
    folder = os.path.dirname(_real(path))
    while True:
        if any(os.path.exists(os.path.join(folder, marker)) for marker in PROTECTED_MARKERS):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_output_file(flag: str, path: str | None, inputs: dict[str, str | None] | None = None) -> None:
    """Refuse, before any work, a file output that would destroy something the user owns or fail at the end.

    `inputs` maps a flag (e.g. "--data", "--adapter") to a local file or folder the command reads; the output may not
    be that file, nor lie inside that folder, nor inside any adapter or run folder (see `PROTECTED_MARKERS`), and its
    folder must exist and be writable. Raises `OutputPathError` with one line naming `flag` and `path`.
    """
    if path is None:
        return
    where = f"{flag} {path}"
    if os.path.isdir(path):
        raise OutputPathError(f"{where}: is a folder; give a file name")
    for name, source in (inputs or {}).items():
        if not source or not os.path.exists(source):
            continue
        if os.path.isdir(source) and _within(path, source):
            raise OutputPathError(f"{where}: lies inside {name} {source}, which this command reads; refusing to "
                                  "write there, choose another path")
        if not os.path.isdir(source) and _same(path, source):
            raise OutputPathError(f"{where}: is the same file as {name} {source}; refusing to overwrite an input, "
                                  "choose another path")
    guarded = protected_folder(path)
    if guarded is not None:
        raise OutputPathError(f"{where}: lies inside {guarded}, an adapter or training-run folder; refusing to write "
                              "there, choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputPathError(f"{where}: folder {folder} does not exist")
    try:  # a real probe: os.access says yes to root even on a read-only mount or an immutable folder
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputPathError(f"{where}: folder {folder} is not writable ({err.strerror or err})") from None


def check_output_dir(flag: str, path: str, writes: list[str], inputs: dict[str, str | None]) -> None:
    """Refuse a training output folder that would overwrite an input or nest in another adapter or run folder.

    `writes` are the names the trainer creates in `path` (dag.json, one folder per node, final, ...); no input
    (`inputs`: flag -> local file or folder) may be one of them or lie inside one, and no input folder (e.g. the base)
    may hold `path`. `path` itself may be an earlier run folder (for --resume) but not an adapter folder.
    """
    where = f"{flag} {path}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{where}: is a file, not a folder")
    for name, source in inputs.items():
        if not source or not os.path.exists(source):
            continue
        if _same(path, source) or (os.path.isdir(source) and _within(path, source)):
            raise OutputPathError(f"{where}: is or lies inside {name} {source}, which this run reads; choose another "
                                  "--output_dir")
        for item in writes:
            if _within(source, os.path.join(path, item)):
                raise OutputPathError(f"{where}: training would write {os.path.join(path, item)}, which is or holds "
                                      f"{name} {source}; choose another --output_dir")
    real = _real(path)
    own = os.path.isfile(os.path.join(real, "dag.json"))
    if not own and any(os.path.exists(os.path.join(real, m)) for m in PROTECTED_MARKERS):
        raise OutputPathError(f"{where}: is an adapter folder; choose another --output_dir")
    guarded = protected_folder(real)  # the folders above it
    if guarded is not None:
        raise OutputPathError(f"{where}: lies inside {guarded}, an adapter or training-run folder; choose another "
                              "--output_dir")
