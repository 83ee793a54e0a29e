"""Output-path guards: an output may not overwrite an input, nor land inside an adapter, node or run folder.

Checked before any work starts, so that a command cannot destroy what the user owns or fail at its last step.
"""

from __future__ import annotations

import os
import tempfile

from .run_folder import ADAPTER_FILES, COMPLETE_MARKER, DAG_FILE, LOCK_DIR, RUN_WRITES, RunFolder

# A folder holding one of these is a trained adapter (adapter_config.json, adapter_model.safetensors), a finished
# node (COMPLETE) or a training run (dag.json): nothing but the trainer writes there.
PROTECTED_MARKERS = (DAG_FILE, COMPLETE_MARKER, *ADAPTER_FILES)


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
    own = RunFolder(real).exists()
    if not own and any(os.path.exists(os.path.join(real, m)) for m in PROTECTED_MARKERS):
        raise OutputPathError(f"{where}: is an adapter folder; choose another --output_dir")
    guarded = protected_folder(real)  # the folders above it
    if guarded is not None:
        raise OutputPathError(f"{where}: lies inside {guarded}, an adapter or training-run folder; choose another "
                              "--output_dir")


def check_run_contents(output_dir: str | os.PathLike, nodes: list[str], where: str | None = None) -> None:
    """Refuse a run folder where something the trainer writes would leave it: a symbolic link at a node folder,
    `final/`, `runs/`, `.locks/`, dag.json or the card, or anywhere below them (e.g. `<out>/macro -> ~/notes`, or a node
    folder linked into the base). Every write of the trainer then lands inside the output folder itself; the output
    guards above keep inputs, bases and adapters out of it. Raises `OutputPathError` naming the link and its target.
    """
    root = _real(output_dir)
    where = where or str(output_dir)
    for name in dict.fromkeys([*RUN_WRITES, *nodes]):
        top = os.path.join(root, name)
        paths = [top]
        if os.path.isdir(top) and not os.path.islink(top):
            for folder, dirs, files in os.walk(top):  # os.walk does not follow links: each is seen, not entered
                paths += [os.path.join(folder, entry) for entry in (*dirs, *files)]
        for path in paths:
            if os.path.islink(path):
                raise OutputPathError(f"{where}: {path} is a symbolic link to {os.path.realpath(path)}; the trainer "
                                      "writes only inside the output folder: remove the link or choose another "
                                      "--output_dir")
            if name == LOCK_DIR and os.path.isfile(path) and os.stat(path).st_nlink > 1:  # lock files are rewritten
                raise OutputPathError(f"{where}: {path} is a hard link shared with another file, which taking the "
                                      "lock would overwrite; remove it")
