"""Atomic writes: a file is either its old self or its complete new self, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
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


# Input size limits: far above any real file of its kind, far below memory (a file linked to /dev/zero, a runaway log).
JSON_MAX_BYTES = 256 * 2**20  # metrics.json / trainer_state.json hold one history entry per step (10M steps at most)
YAML_MAX_BYTES = 16 * 2**20  # a 1,000-node curriculum is about 100 KB
YAML_MAX_NODES = 1_000_000  # YAML values after alias expansion (an alias bomb expands to billions)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """A file's bytes, refusing one larger than `max_bytes` (checked while reading: /dev/zero has no size)."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes // 2**20} MiB (io_utils limit); not a file of this kind, "
                         "restore or delete it")
    return data


def read_json(path: str | os.PathLike, max_bytes: int = JSON_MAX_BYTES) -> dict:
    """A JSON object from a file; a file that is not JSON, holds no object or is too large is a ValueError naming it."""
    try:
        data = json.loads(read_bounded(path, max_bytes).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON ({str(err)[:200]}); restore or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}; restore or delete it")
    return data


class YAMLInputError(yaml.YAMLError):
    """A YAML file refused by `read_yaml`: too large, an alias expansion past the limit, or a key given twice."""


class _GuardedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently) and a document
    whose aliases expand to more than `YAML_MAX_NODES` values (counted on the node graph before anything is built)."""

    def construct_document(self, node):
        sizes: dict[int, int] = {}
        visiting: set[int] = set()
        stack = [(node, False)]
        while stack:  # post-order over the graph: each node sized once, each reference counts its whole expansion
            current, expanded = stack.pop()
            key = id(current)
            if key in sizes:
                continue
            children = [] if isinstance(current, yaml.ScalarNode) else [
                c for pair in current.value for c in (pair if isinstance(pair, tuple) else (pair,))]
            if not expanded:
                if any(id(c) in visiting and id(c) not in sizes for c in children):  # an ancestor on the path
                    raise YAMLInputError("an alias refers to its own anchor (a recursive structure)")
                visiting.add(key)
                stack.append((current, True))
                stack.extend((c, False) for c in children if id(c) not in sizes and id(c) not in visiting)
                continue
            own = 1 + len(current.value) // 100 if isinstance(current, yaml.ScalarNode) else 1  # long strings weigh
            sizes[key] = own + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > YAML_MAX_NODES:
                raise YAMLInputError(f"its anchors and aliases expand to more than {YAML_MAX_NODES:,} values "
                                     "(io_utils.YAML_MAX_NODES)")
        if getattr(self, "check_node", None) is not None:
            self.check_node(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict[tuple, int] = {}
        for key, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise YAMLInputError(f"key {key.value!r} is given twice in one mapping (lines "
                                         f"{seen[(key.tag, key.value)]} and {line}); keep one")
                seen[(key.tag, key.value)] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike, check_node=None):
    """A YAML file's data with yaml.safe_load's types (no tags that build objects), refusing a file over
    `YAML_MAX_BYTES`, an alias expansion over `YAML_MAX_NODES` and a key given twice; raises `yaml.YAMLError`.
    `check_node(root)`, if given, sees the composed document first (e.g. `data.check_duplicate_fields`, whose message
    names the columns)."""
    try:
        text = read_bounded(path, YAML_MAX_BYTES).decode("utf-8")
    except ValueError as err:  # too large, or not UTF-8
        raise YAMLInputError(str(err).replace(f"{path} is", "the file is").splitlines()[0][:200]) from None
    try:
        loader = _GuardedLoader(text)  # what yaml.load does, with our SafeLoader subclass
        loader.check_node = check_node
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:
        raise YAMLInputError("it is nested too deeply") from None


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """safetensors reports I/O failures (disk full, EFBIG) as its own error type: make them one-line OSErrors."""
    try:
        yield
    except SafetensorError as err:
        raise OSError(f"could not write {what}: {str(err).splitlines()[0]}") from None
