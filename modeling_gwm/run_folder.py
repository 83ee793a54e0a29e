"""The run folder (`--output_dir`): the one place that knows its layout, its markers and its locks.

    <output_dir>/
    ├── dag.json  README.md  loss_curves.png   the run: order, status, parents, merge and retention per node; index card
    ├── <node>/    adapter_config.json  adapter_model.safetensors  metrics.json  README.md  loss_curve.png  COMPLETE
    │              checkpoint/ while the node trains (removed when it completes)
    ├── final/     a copy of the sink node's folder
    ├── runs/      accelerate's trackers (tensorboard, ...)
    └── .locks/    <node>.lock and output.lock (filelock; the OS drops a lock when its process dies, SIGKILL included)

Trainer, cards, Hub transfer and the CLI ask a `RunFolder` for paths and state instead of re-deriving them. A node is
complete when its adapter files and the `COMPLETE` marker (written last) are all there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .io_utils import atomic_replace_dir, atomic_write_bytes, atomic_write_json, file_sha256, read_json

# File names: every module asks for these names here instead of writing the literal.
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
METRICS_FILE = "metrics.json"  # a node's training record (losses, checksum, calibration)
CARD_FILE = "README.md"  # a node's or a run's model card
LOSS_CURVE_FILE = "loss_curve.png"  # a node's loss curve
LOSS_CURVES_FILE = "loss_curves.png"  # the run's loss curves, every node
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
NODE_FILES = (*ADAPTER_FILES, CARD_FILE, LOSS_CURVE_FILE, METRICS_FILE)  # what a node publishes
COMPLETE_MARKER = "COMPLETE"
CHECKSUM_KEY = "adapter_sha256"  # metrics.json: the SHA-256 of the node's adapter_model.safetensors
DAG_FILE = "dag.json"
FINAL_NODE = "final"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STAGING = ".checkpoint.tmp"  # a checkpoint being written, swapped in whole as checkpoint/
LOCK_DIR = ".locks"
# Every name the trainer creates in the run folder besides one folder per node (for the output-path guards).
RUN_WRITES = (DAG_FILE, CARD_FILE, LOSS_CURVES_FILE, "runs", LOCK_DIR, FINAL_NODE, ".final.tmp", ".final.old")


class NodeBusyError(RuntimeError):
    """Another live process is training the same node into the same output directory."""


class RunFolder:
    """Paths, markers, `dag.json` (read-modify-write under a lock), node locks and `final/` of one run folder."""

    def __init__(self, path: str | os.PathLike):
        self.given = os.fspath(path)  # as the user wrote it, for messages
        self.path = Path(os.path.abspath(self.given))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ paths and state
    @property
    def dag_path(self) -> Path:
        return self.path / DAG_FILE

    def exists(self) -> bool:
        """Whether this is a run folder (it has a dag.json)."""
        return self.dag_path.is_file()

    def require(self) -> RunFolder:
        if not self.exists():
            raise FileNotFoundError(f"{self.given} is not a GWM run folder (no {DAG_FILE})")
        return self

    def node_dir(self, name: str) -> Path:
        return self.path / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.node_dir(name) / CHECKPOINT_DIR

    def has_adapter(self, name: str) -> bool:
        return all((self.node_dir(name) / f).is_file() for f in ADAPTER_FILES)

    def is_complete(self, name: str) -> bool:
        return (self.node_dir(name) / COMPLETE_MARKER).is_file() and self.has_adapter(name)

    def read_node_json(self, name: str, filename: str) -> dict:
        """`<node>/<filename>` (metrics.json, adapter_config.json) as a dict; a clear error if it is not JSON."""
        return read_json(self.node_dir(name) / filename)

    def read_node_json_if_any(self, name: str, filename: str) -> dict:
        """Like `read_node_json`, but {} when the file is not there (a node not trained yet, a bare adapter folder)."""
        path = self.node_dir(name) / filename
        return read_json(path) if path.is_file() else {}

    def adapter_sha256(self, name: str) -> str:
        """The SHA-256 of a node's adapter_model.safetensors (recorded in its metrics.json as `adapter_sha256`)."""
        return file_sha256(self.node_dir(name) / ADAPTER_FILES[1])

    def verified_metrics(self, name: str) -> dict:
        """A complete node's metrics.json, after checking that its adapter weights are the ones it recorded.

        A missing metrics.json, or weights whose SHA-256 differs from `adapter_sha256` (damaged, truncated, or another
        adapter's file copied in), is a ValueError naming the node and file and how to recover.
        """
        folder, path = self.node_dir(name), self.node_dir(name) / METRICS_FILE
        if not path.is_file():
            raise ValueError(f"node {name!r}: {path} is missing, so its settings and adapter checksum cannot be "
                             f"checked; restore it, or delete {folder / COMPLETE_MARKER} to train the node again")
        metrics = read_json(path)
        recorded = metrics.get(CHECKSUM_KEY)
        if recorded is not None and recorded != self.adapter_sha256(name):
            raise ValueError(f"node {name!r}: {folder / ADAPTER_FILES[1]} is not the adapter the node wrote (its "
                             f"SHA-256 differs from {CHECKSUM_KEY} in metrics.json: damaged or replaced); restore it, "
                             f"or delete {folder / COMPLETE_MARKER} to train the node again")
        return metrics

    def adapter_fields(self, name: str) -> list[str]:
        """The field names a saved node adapter holds, in its slot order."""
        return [f["name"] for f in self.read_node_json(name, ADAPTER_CONFIG_FILE)["fields"]]

    # ------------------------------------------------------------------ dag.json
    def read_dag(self) -> dict:
        """dag.json as a dict ({} before the first write); 'nodes' must map names to objects."""
        dag = read_json(self.dag_path) if self.dag_path.is_file() else {}
        nodes = dag.get("nodes", {})
        if not isinstance(nodes, dict) or not all(isinstance(entry, dict) for entry in nodes.values()):
            raise ValueError(f"{self.dag_path}: 'nodes' must map node names to objects; restore or delete the file")
        return dag

    def write_dag(self, dag: dict) -> None:
        """Replace dag.json atomically; call inside `lock()` when other jobs may share the folder."""
        atomic_write_json(self.dag_path, dag)

    @staticmethod
    def node_names(dag: dict) -> list[str]:
        """Every node `dag` names, in run order: its `order`, then any other entry of `nodes`."""
        return list(dict.fromkeys([*(dag.get("order") or []), *(dag.get("nodes") or {})]))

    def published_nodes(self, dag: dict) -> list[str]:
        """Every node of `dag` whose adapter files are on disk, in run order, then `final` when it exists."""
        return [n for n in [*self.node_names(dag), FINAL_NODE] if self.has_adapter(n)]

    # ------------------------------------------------------------------ locks
    def lock(self) -> FileLock:
        """Serialise short read-modify-write sections on run-level files (dag.json, final/, the index card)."""
        path = self.path / LOCK_DIR / "output.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path)

    # ------------------------------------------------------------------ finishing
    def mark_complete(self, name: str) -> None:
        """Written last: from here on the node counts as done; its checkpoint is no longer needed."""
        atomic_write_bytes(self.node_dir(name) / COMPLETE_MARKER, b"complete\n")
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)

    def write_final(self, sink: str) -> None:
        """Copy the sink node's folder to `final/` (atomically; two jobs finishing at once take turns)."""
        with self.lock():
            staging = self.path / ".final.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(self.node_dir(sink), staging, ignore=shutil.ignore_patterns(CHECKPOINT_DIR, ".*"))
            atomic_replace_dir(staging, self.path / FINAL_NODE)


@contextlib.contextmanager
def node_lock(output_dir: str | os.PathLike, name: str) -> Iterator[None]:
    """Claim `<output_dir>/.locks/<node>.lock` for training `name`; `NodeBusyError` at once if a live process holds it.

    The holder writes its pid into the lock file (filelock never truncates it), so a refusal names the holder.
    """
    folder = RunFolder(output_dir).path
    path = folder / LOCK_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise NodeBusyError(f"node {name!r} is already being trained into {folder} by {_holder(path)} "
                            f"(lock {path}); wait for that job or use another --output_dir") from None
    try:
        path.write_text(f"{os.getpid()}\n", encoding="utf-8")
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"
