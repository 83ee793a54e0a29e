"""DAG curriculum training with accelerate: one frozen base per process, one adapter per node.

Every node goes through the same phases: start its adapter (seeded init, fork copy or join merge), train, evaluate,
write its outputs atomically. Batches are derived from (seed, node, step) alone, so a resumed or multi-process run
sees exactly the batches an uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    broadcast_object_list,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
    set_seed,
)
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .canvas import season_period
from .configuration_gwm import DEFAULT_BASE
from .curriculum import Curriculum, CurriculumError, TrainingNode
from .data import CanvasDataset, DataSource, NodeData, build_node_data, collate_canvas
from .io_utils import (
    atomic_move_file,
    atomic_replace_dir,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
)
from .loop import LoopConfig
from .masking import sample_target_mask
from .merging import MergeSpec, align_fields, merge_adapters
from .modeling_gwm import GWMModel
from .run_folder import ADAPTER_FILES, NodeBusyError, RunFolder, node_lock
from .tabular import DataError

logger = get_logger(__name__)


_TRACKERS = {"tensorboard": is_tensorboard_available, "trackio": is_trackio_available, "wandb": is_wandb_available}


def show_progress() -> bool:
    """Progress bars only on a terminal, or when GWM_PROGRESS=1 asks (GWM_PROGRESS=0: never).

    Under a launcher, a scheduler or `> log`, tqdm's carriage-return redraws would fill the log; a log line per node
    (start; end with losses and time) is written instead.
    """
    choice = os.environ.get("GWM_PROGRESS", "").strip()
    return choice == "1" if choice in ("0", "1") else sys.stderr.isatty()


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class NodeNotReadyError(RuntimeError):
    """A node's parents have no complete adapter in the output directory yet."""


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient under `nonfinite="stop"`: the node stops, its last good checkpoint is kept."""


def _crash_point(phase: str, node: str, step: int | None = None) -> None:
    """Test hook for the crash-safety tests: `GWM_CRASH_AT=<phase>:<node>[:<step>]` SIGKILLs this process here.

    Phases: step, checkpoint_mid, checkpoint_written (with a step); merge_done, adapter_written, before_complete,
    node_done (without).
    """
    spec = os.environ.get("GWM_CRASH_AT")
    if spec and spec == (f"{phase}:{node}" if step is None else f"{phase}:{node}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _writing(what: str):
    """safetensors reports I/O failures (disk full, EFBIG) as its own error type: make them one-line OSErrors."""
    try:
        yield
    except SafetensorError as err:
        raise OSError(f"could not write {what}: {str(err).splitlines()[0]}") from None


def _inject_nan(node: str, step: int) -> bool:
    """Test hook: `GWM_INJECT_NAN=<node>:<step>` turns that step's loss into NaN (a real run, a real NaN)."""
    return os.environ.get("GWM_INJECT_NAN") == f"{node}:{step}"


@dataclass
class NodeState:
    """What a node's training loop carries between steps (and across a resume)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    skipped_nonfinite: int = 0


def _step_seed(seed: int, node_index: int, step: int) -> int:
    return (seed * 1_000_003 + node_index * 7_919 + step) % (2**63 - 1)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) plus JSON-able metadata: no pickle anywhere."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entries in state["state"].items() for key, value in entries.items()
               if torch.is_tensor(value)}
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class DAGCurriculumTrainer:
    """Train every node of a DAG curriculum in topological order on one shared frozen base.

    The seed's API: `DAGCurriculumTrainer(nodes=dag, data_sources=sources, backbone="cogvideox",
    pretrained_model_id="THUDM/CogVideoX-2b", device="cuda").run()`; `training/dag_train.py` builds the same
    trainer from a YAML curriculum (`curriculum=load_curriculum(path)`).
    """

    def __init__(
        self,
        nodes: list[TrainingNode] | None = None,
        data_sources: dict[str, DataSource] | None = None,
        backbone: str | None = None,
        pretrained_model_id: str | None = None,
        device: str | None = None,
        *,
        curriculum: Curriculum | None = None,
        output_dir: str = "outputs/gwm",
        model_config: dict | None = None,
        seed: int = 0,
        resume: bool = False,
        max_steps: int | None = None,
        only_nodes: list[str] | None = None,
        with_ancestors: bool = True,
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        report_to: str = "none",
        gradient_checkpointing: bool = False,
        push_to_hub: bool = False,
        hub_model_id: str | None = None,
        hub_token: str | None = None,
        write_cards: bool = True,
        nonfinite: str = "stop",
        allow_changed_config: bool = False,
    ):
        if curriculum is None:
            if not nodes or data_sources is None:
                raise CurriculumError("DAGCurriculumTrainer needs nodes and data_sources, or a curriculum")
            curriculum = Curriculum(nodes=list(nodes), sources=dict(data_sources), model=dict(model_config or {}))
        self.curriculum = curriculum
        self.model_config = {**curriculum.model, **(model_config or {})}
        if backbone is not None:
            self.model_config["backbone"] = backbone
        if pretrained_model_id is not None:
            self.model_config["base"] = pretrained_model_id
        self.run_folder = RunFolder(output_dir)
        self.output_dir = str(self.run_folder.path)
        self.seed = seed
        self.resume = resume
        self.max_steps = max_steps
        self.only_nodes = only_nodes
        self.with_ancestors = with_ancestors
        self.gradient_checkpointing = gradient_checkpointing
        self.push_to_hub, self.hub_model_id, self.hub_token = push_to_hub, hub_model_id, hub_token
        self.write_cards = write_cards
        if nonfinite not in ("stop", "skip"):
            raise CurriculumError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.allow_changed_config = allow_changed_config
        if push_to_hub and not hub_model_id:
            raise CurriculumError("--push_to_hub needs --hub_model_id (e.g. user/gwm-demo)")
        for name in only_nodes or []:
            if name not in {n.name for n in curriculum.nodes}:
                raise CurriculumError(f"{curriculum.where}: --nodes names unknown node {name!r}")
        log_with = None if report_to in (None, "none") else report_to
        if log_with and not _TRACKERS.get(log_with, lambda: True)():
            raise CurriculumError(f"--report_to {log_with} needs the {log_with} package: pip install {log_with}")
        # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA starts N torchrun processes;
        # accelerate only joins them into one gloo (MULTI_CPU) group when told to use the CPU, else each process
        # would silently train alone on the full batch.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        use_cpu = device == "cpu" or (device is None and launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(
            cpu=use_cpu, mixed_precision=mixed_precision, log_with=log_with,
            gradient_accumulation_steps=gradient_accumulation_steps,
            project_dir=os.path.join(self.output_dir, "runs"),
        )
        self.model = None
        self.peft_model = None

    # ------------------------------------------------------------------ plan
    def selected_nodes(self) -> list[str]:
        order = self.curriculum.order()
        if not self.only_nodes:
            return order
        wanted = set(self.only_nodes)
        if self.with_ancestors:
            for name in self.only_nodes:
                wanted.update(self.curriculum.ancestors(name))
        return [n for n in order if n in wanted]

    def node_dir(self, name: str) -> str:
        return str(self.run_folder.node_dir(name))

    def is_complete(self, name: str) -> bool:
        return self.run_folder.is_complete(name)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        acc = self.accelerator
        set_seed(self.seed)
        if not show_progress():
            import datasets

            datasets.disable_progress_bars()  # its "Generating train split" bars too
        selected = self.selected_nodes()
        requested = set(self.only_nodes or selected)
        if not self.resume:
            done = [n for n in selected if n in requested and self.is_complete(n)]
            if done:
                raise CurriculumError(f"{self.output_dir} already holds trained node(s) {done}: pass --resume to keep "
                                      "and skip them, or choose a new --output_dir")
        self.preflight([n for n in selected if not self.is_complete(n)])
        if self.resume:
            self.check_unchanged(selected)
        os.makedirs(self.output_dir, exist_ok=True)
        if acc.is_main_process:
            with self.run_folder.lock():
                dag = self._load_dag()
                self.run_folder.write_dag(dag)
        else:
            dag = self._load_dag()
        if acc.log_with:
            acc.init_trackers("gwm", config={"seed": self.seed, **{k: str(v) for k, v in self.model_config.items()}})
        for name in selected:
            if self.is_complete(name):
                logger.info(f"node {name}: complete in {self.node_dir(name)}, skipped", main_process_only=True)
                continue
            self._check_parents_ready(name)
            with self._claim_node(name):
                if self.is_complete(name):  # another job finished it meanwhile
                    continue
                self.train_node(name, dag)
            _crash_point("node_done", name)
        self._write_final(dag)
        if acc.log_with:
            acc.end_training()
        if self.push_to_hub and acc.is_main_process:
            from .hub import push_curriculum

            url = push_curriculum(self.output_dir, self.hub_model_id, token=self.hub_token)
            logger.info(f"pushed the curriculum to {url}", main_process_only=True)
        acc.wait_for_everyone()
        return self._load_dag()

    def preflight(self, names: list[str]) -> None:
        """Fail before any node trains on what would otherwise only show at a node's first step.

        The YAML checks ran at load time; what needs the launch or the data is checked here: the global batch must
        split over processes × accumulation steps, and every node's sources must give train and validation windows.
        """
        acc = self.accelerator
        for name in names:
            node = self.curriculum.node(name)
            if node.batch_size % (acc.num_processes * acc.gradient_accumulation_steps):
                raise CurriculumError(f"{self.curriculum.where}: node {name!r}: batch_size {node.batch_size} is not "
                                      f"divisible by {acc.num_processes} processes × {acc.gradient_accumulation_steps} "
                                      "accumulation steps")
            try:
                self._node_data(name)  # built again when the node trains: memory stays one node's data
            except DataError as err:
                raise DataError(f"{self.curriculum.where}: node {name!r}: {err}") from None
            for parent in node.parents:
                if self.is_complete(parent):  # trained by an earlier job, maybe elsewhere
                    self._check_same_origin(name, parent)

    def _check_same_origin(self, name: str, parent: str) -> None:
        """Forks and joins need parents grown from this job's seeded init (a join averages their task vectors)."""
        recorded = read_json(os.path.join(self.node_dir(parent), "adapter_config.json")).get("gwm_config") or {}
        ours = {"seed": self.model_config.get("seed", self.seed),
                "backbone": self.model_config.get("backbone", "cogvideox")}
        for key, value in ours.items():
            if key in recorded and recorded[key] != value:
                raise CurriculumError(f"node {name!r}: parent {parent!r} in {self.node_dir(parent)} was trained with "
                                      f"model {key} {recorded[key]!r}, this job uses {value!r}; give every job of a "
                                      "curriculum the same model settings (set model.seed in the curriculum)")

    def node_config(self, name: str) -> dict:
        """Everything that makes a node's adapter what it is, as plain JSON: the node's resolved settings, its fields
        and source declarations, the model, the seed, the mixed precision. Recorded when the node starts (dag.json),
        with each checkpoint and in metrics.json; `--resume` compares it with the curriculum given."""
        node = self.curriculum.node(name)
        settings = {k: v for k, v in node.to_dict().items() if k not in ("name", "description", "checkpoint_every")}
        config = {**settings, "fields": self.curriculum.node_fields(name),
                  "adapter_fields": self.curriculum.adapter_fields(name),
                  "source_declarations": {s: self.curriculum.sources[s].to_dict() for s in node.sources},
                  "seed": self.seed, "model": {k: os.path.abspath(v) if k == "base" and os.path.isdir(str(v)) else v
                                               for k, v in self.model_config.items()
                                               if k != "gradient_checkpointing"},
                  "mixed_precision": str(self.accelerator.mixed_precision)}
        return json.loads(json.dumps(config, default=str))

    def check_unchanged(self, selected: list[str]) -> None:
        """Refuse to resume a run whose curriculum or settings changed under it (the result would be a mix).

        Compared: every half-trained node to be continued (its checkpoint's record) and every complete node this job
        keeps or builds on (its metrics.json record). `allow_changed_config` lets the new settings take over.
        """
        if self.allow_changed_config:
            return
        to_train = [n for n in selected if not self.is_complete(n)]
        used = set(selected) | {a for n in to_train for a in self.curriculum.ancestors(n)}
        for name in [n for n in self.curriculum.order() if n in used]:
            folder = self.node_dir(name)
            if self.is_complete(name):
                recorded, state = read_json(os.path.join(folder, "metrics.json")).get("config"), "was trained"
            elif os.path.isfile(os.path.join(folder, "checkpoint", "trainer_state.json")):
                saved = read_json(os.path.join(folder, "checkpoint", "trainer_state.json"))
                recorded, state = saved.get("config"), f"is half-trained (step {saved.get('step')})"
            else:
                continue
            if not isinstance(recorded, dict):  # a run from before these records: nothing to compare
                continue
            changes = _config_changes(recorded, self.node_config(name))
            if changes:
                shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
                raise CurriculumError(f"{self.curriculum.where}: node {name!r} {state} in {folder} with settings "
                                      f"that changed since the run started: {shown}; pass --allow_changed_config to "
                                      "continue with the new settings, or use a new --output_dir")

    def _load_dag(self) -> dict:
        """dag.json as on disk, brought up to date with the curriculum (order, kinds, parents, merges, done nodes)."""
        dag = self.run_folder.read_dag()
        dag.setdefault("nodes", {})
        dag.update({"curriculum": self.curriculum.path, "order": self.curriculum.order(), "seed": self.seed,
                    "base": self.model_config.get("base", DEFAULT_BASE), "sink": self.curriculum.sink()})
        for name in self.curriculum.order():
            node = self.curriculum.node(name)
            entry = dag["nodes"].setdefault(name, {"status": "pending"})
            entry.update({"kind": node.kind, "parents": node.parents, "output": name,
                          "merge": None if node.kind != "join" else {
                              "method": (node.merge or MergeSpec()).method, "weights": node.merge_weights(),
                              "density": (node.merge or MergeSpec()).density}})
            if self.is_complete(name):
                entry["status"] = "done"
        return dag

    def _update_dag(self, dag: dict, name: str, **values) -> None:
        dag["nodes"][name].update(values)
        if self.accelerator.is_main_process:
            with self.run_folder.lock():  # another job may be updating other nodes right now
                current = self._load_dag()
                current["nodes"][name].update(dag["nodes"][name])
                self.run_folder.write_dag(current)

    @contextlib.contextmanager
    def _claim_node(self, name: str):
        """Hold the node's lock (main process) for the `with` block; every process raises if another job holds it."""
        acc = self.accelerator
        with contextlib.ExitStack() as stack:
            error = None
            if acc.is_main_process:
                try:
                    stack.enter_context(node_lock(self.output_dir, name))
                except NodeBusyError as err:
                    error = str(err)
            if acc.num_processes > 1:
                error = broadcast_object_list([error])[0]
            if error:
                raise NodeBusyError(error)
            yield

    def _check_parents_ready(self, name: str) -> None:
        missing = [p for p in self.curriculum.node(name).parents if not self.is_complete(p)]
        if missing:
            raise NodeNotReadyError(f"node {name!r} cannot start: parent adapter(s) {missing} are not complete in "
                                    f"{self.output_dir} (train them first, e.g. --nodes {' '.join(missing)})")

    # ------------------------------------------------------------------ model
    def _ensure_model(self) -> GWMModel:
        if self.model is None:
            config = {k: v for k, v in self.model_config.items() if k != "base"}
            config.setdefault("seed", self.seed)
            config["gradient_checkpointing"] = self.gradient_checkpointing or config.get("gradient_checkpointing",
                                                                                         False)
            base = self.model_config.get("base", DEFAULT_BASE)
            self.model = GWMModel.from_pretrained(base, device=self.accelerator.device, **config)
            logger.info(f"frozen base {self.model.base_source}: {len(self.model.transformer_blocks)} blocks, "
                        f"inner_dim {self.model.inner_dim}", main_process_only=True)
        return self.model

    def _node_data(self, name: str) -> NodeData:
        node = self.curriculum.node(name)
        return build_node_data([self.curriculum.sources[s] for s in node.sources], self.curriculum.node_fields(name),
                               node.context_len, val_fraction=node.val_fraction)

    def _field_meta(self, name: str, data: NodeData) -> list[dict]:
        inherited: dict[str, dict] = {}
        for parent in self.curriculum.node(name).parents:
            for entry in read_json(os.path.join(self.node_dir(parent), "adapter_config.json"))["fields"]:
                inherited.setdefault(entry["name"], entry)
        # "frequency": the grid this node trained on, so forecasting puts a history on the same grid
        lost = [f for f in self.curriculum.adapter_fields(name) if f not in data.stats and f not in inherited]
        if lost:
            raise CurriculumError(f"{self.curriculum.where}: node {name!r}: field(s) {lost} should come from parent(s) "
                                  f"{self.curriculum.node(name).parents}, whose adapters in {self.output_dir} do not "
                                  "hold them (the curriculum changed after they were trained); retrain those parents "
                                  "or use a new --output_dir")
        return [{**(data.stats[f].to_dict() if f in data.stats else inherited[f]), "frequency": data.frequency}
                for f in self.curriculum.adapter_fields(name)]

    def _attach_adapter(self, name: str, fields_meta: list[dict]) -> dict[str, torch.Tensor]:
        """Add the node's adapter (fresh = the shared seeded init), drop all others; returns the init state."""
        node = self.curriculum.node(name)
        model = self._ensure_model()
        model.config.context_len, model.config.horizon = node.context_len, node.horizon
        model.config.season_period = season_period(next((f.get("frequency") for f in fields_meta), None))
        config = LoopConfig(n_loops=node.n_loops, fields=fields_meta)
        if self.peft_model is None:
            self.peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, config)
        self.peft_model.set_adapter(name)
        for other in list(self.peft_model.peft_config):
            if other != name:
                self.peft_model.delete_adapter(other)  # memory stays constant however many nodes came before
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft_model, adapter_name=name).items()}

    def _parent_state(self, parent: str) -> tuple[dict[str, torch.Tensor], list[str]]:
        state = load_file(self.run_folder.node_dir(parent) / "adapter_model.safetensors")
        return state, self.run_folder.adapter_fields(parent)

    def start_state(self, name: str, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Root: the seeded init. Fork: the parent's adapter. Join: the weighted merge of the parents."""
        node = self.curriculum.node(name)
        child_fields = self.curriculum.adapter_fields(name)
        if node.kind == "root":
            return init
        parents = [self._parent_state(p) for p in node.parents]
        if node.kind == "fork":
            state, fields = parents[0]
            return align_fields(state, fields, child_fields, init)[0]
        return merge_adapters([s for s, _ in parents], [f for _, f in parents], child_fields, init,
                              spec=node.merge or MergeSpec(), weights=node.merge_weights(), seed=self.seed)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: CanvasDataset, field_ids: torch.Tensor, horizon: int, max_windows: int) -> float:
        """Forecast loss on held-out positions: the last `horizon` steps of validation windows are hidden; the mean
        pinball loss of the model's quantiles, in each window's scaled units (the training loss)."""
        if len(dataset) == 0:
            return float("nan")
        picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), max_windows)).round().long().unique()
        model = self.peft_model
        was_training = model.training
        model.eval()
        sse, count = 0.0, 0.0
        for chunk in picks.split(64):
            batch = collate_canvas([dataset[int(i)] for i in chunk])
            values = batch["values"].to(self.accelerator.device)
            presence = batch["presence"].to(self.accelerator.device)
            target = torch.zeros_like(presence)
            target[:, -horizon:] = True
            with self.accelerator.autocast():
                position_loss = model(values, presence, field_ids=field_ids, target_mask=target).position_loss
            scored = target & presence & batch.get("holdout", presence).to(presence.device)
            sse += float((position_loss.float() * scored).sum())
            count += float(scored.sum())
        model.train(was_training)
        return sse / count if count else float("nan")

    def _retention(self, name: str, child_fields: list[str]) -> dict:
        """For a join: the merged adapter's loss on each parent's validation data, next to the parent's own."""
        out = {}
        for parent in self.curriculum.node(name).parents:
            node = self.curriculum.node(parent)
            data = self._node_data(parent)
            ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=self.accelerator.device)
            merged = self.evaluate(data.val, ids, node.horizon, node.eval_windows)
            own = read_json(os.path.join(self.node_dir(parent), "metrics.json")).get("val_loss_end")
            out[parent] = {"parent_val_loss": own, "merged_val_loss": merged,
                           "retention": (own / merged) if own and merged == merged and merged > 0 else None}
        return out

    # ------------------------------------------------------------------ training
    def _batch(self, data: NodeData, node: TrainingNode, node_index: int, step: int) -> list[dict]:
        """This process's micro-batches of the step's global batch, plus the global count of scored positions."""
        acc = self.accelerator
        world, accumulation = acc.num_processes, acc.gradient_accumulation_steps
        if node.batch_size % (world * accumulation):
            raise CurriculumError(f"node {node.name!r}: batch_size {node.batch_size} is not divisible by "
                                  f"{world} processes × {accumulation} accumulation steps")
        generator = torch.Generator().manual_seed(_step_seed(self.seed, node_index, step))
        picks = torch.randint(len(data.train), (node.batch_size,), generator=generator)
        batch = collate_canvas([data.train[int(i)] for i in picks])
        mask = sample_target_mask(batch["presence"], node.horizon, node.random_fraction, node.forecast_probability,
                                  generator=generator)
        scored_total = float((mask & batch["presence"]).sum().clamp_min(1))
        per_process = node.batch_size // world
        rows = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
        micro = per_process // accumulation
        out = []
        for k in range(accumulation):
            part = slice(rows.start + k * micro, rows.start + (k + 1) * micro)
            out.append({key: batch[key][part].to(acc.device) for key in ("values", "presence")}
                       | {"target_mask": mask[part].to(acc.device), "scored_total": scored_total})
        return out

    def train_node(self, name: str, dag: dict) -> dict:
        acc = self.accelerator
        node = self.curriculum.node(name)
        node_index = self.curriculum.order().index(name)
        folder = self.node_dir(name)
        started = time.time()
        data = self._node_data(name)
        child_fields = self.curriculum.adapter_fields(name)
        field_ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=acc.device)
        init = self._attach_adapter(name, self._field_meta(name, data))
        config = self.node_config(name)
        self._update_dag(dag, name, status="running", config=config)
        start = self.start_state(name, init)
        _crash_point("merge_done", name)
        set_peft_model_state_dict(self.peft_model, start, adapter_name=name)
        retention = self._retention(name, child_fields) if node.kind == "join" else None

        steps = node.steps if self.max_steps is None else min(node.steps, self.max_steps)
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=node.learning_rate, weight_decay=node.weight_decay)
        state = self._load_checkpoint(name, optimizer, config)
        val_start = self.evaluate(data.val, field_ids, node.horizon, node.eval_windows) if state.step == 0 else None
        if state.step == 0:
            state.val_history.append({"step": 0, "val_loss": val_start})
        ddp_model, optimizer = acc.prepare(self.peft_model, optimizer)
        ddp_model.train()
        progress = tqdm(total=steps, initial=state.step, desc=f"{name} [{node.kind}]",
                        disable=not (acc.is_local_main_process and show_progress()), dynamic_ncols=True)
        logger.info(f"node {name} [{node.kind}]: training steps {state.step + 1}-{steps}, "
                    f"val loss {state.val_history[0]['val_loss']:.4f}", main_process_only=True)
        while state.step < steps:
            sse_step = torch.zeros((), device=acc.device)
            finite, overflow = True, False
            for micro in self._batch(data, node, node_index, state.step):
                with acc.accumulate(ddp_model):
                    with acc.autocast():
                        position_loss = ddp_model(micro["values"], micro["presence"], field_ids=field_ids,
                                                  target_mask=micro["target_mask"]).position_loss
                    scored = micro["target_mask"] & micro["presence"]
                    sse = (position_loss.float() * scored).sum()  # summed pinball loss (scaled units)
                    if _inject_nan(name, state.step + 1):
                        sse = sse * float("nan")
                    scale = acc.num_processes * acc.gradient_accumulation_steps / micro["scored_total"]
                    acc.backward(sse * scale)
                    if acc.sync_gradients:
                        finite = self._all_finite(sse_step + sse.detach(), params, optimizer)
                        _crash_point("step", name, state.step + 1)
                        if finite:
                            optimizer.step()  # under fp16, GradScaler skips a step whose gradients overflowed
                            overflow = acc.scaler is not None and optimizer.step_was_skipped
                        elif acc.scaler is not None:
                            acc.scaler.update()  # the scale backs off even when the guard skips or stops the step
                    optimizer.zero_grad()
                sse_step += sse.detach()
                scored_total = micro["scored_total"]
            train_loss = float(acc.reduce(sse_step, reduction="sum")) / scored_total
            if not finite:
                where = (f"node {name!r}: non-finite loss or gradient at step {state.step + 1} "
                         f"(train loss {train_loss})")
                if self.nonfinite == "stop":
                    progress.close()
                    self._update_dag(dag, name, status="failed", error=f"non-finite at step {state.step + 1}")
                    last = os.path.join(folder, "checkpoint", "trainer_state.json")
                    kept = (f"its last good checkpoint (step {read_json(last)['step']}) is kept in {folder}/checkpoint"
                            if os.path.isfile(last) else "it has no checkpoint yet and will restart from its start")
                    raise NonFiniteError(f"{where}; stopped: {kept}; lower learning_rate and rerun with --resume, or "
                                         "pass --nonfinite skip to skip such steps")
                logger.warning(f"{where}: step skipped (--nonfinite skip)", main_process_only=True)
                state.skipped_nonfinite += 1
            state.step += 1
            state.history.append({"step": state.step, "train_loss": train_loss} if finite else
                                 {"step": state.step, "train_loss": None, "skipped": "non-finite"})
            if overflow:  # GradScaler's business (it lowered the scale), neither a stop nor a counted skip
                state.history[-1]["skipped"] = "fp16 overflow"
                logger.info(f"node {name}: fp16 gradient overflow at step {state.step}, GradScaler skipped the "
                            f"step and lowered the scale to {acc.scaler.get_scale():g}", main_process_only=True)
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}")
            if acc.log_with:
                acc.log({f"{name}/train_loss": train_loss}, step=node_index * 1_000_000 + state.step)
            if state.step % node.checkpoint_every == 0 and state.step < steps:
                val = self.evaluate(data.val, field_ids, node.horizon, node.eval_windows)
                state.val_history.append({"step": state.step, "val_loss": val})
                self._save_checkpoint(name, optimizer, state, config)
        progress.close()
        val_end = self.evaluate(data.val, field_ids, node.horizon, node.eval_windows)
        state.val_history.append({"step": state.step, "val_loss": val_end})
        val_start = state.val_history[0]["val_loss"]
        metrics = {
            "node": name, "kind": node.kind, "parents": node.parents, "steps": state.step,
            "train_loss_start": state.history[0]["train_loss"] if state.history else None,
            "train_loss_end": state.history[-1]["train_loss"] if state.history else None,
            "val_loss_start": val_start, "val_loss_end": val_end,
            "wall_time_s": round(time.time() - started, 2), "skipped_nonfinite_steps": state.skipped_nonfinite,
            "trainable_params": sum(p.numel() for p in params), "n_loops": node.n_loops,
            "fields": data.field_names, "adapter_fields": child_fields, "sources": node.sources,
            "date_range": {"start": min(a for a, _ in data.date_range.values()),
                           "end": max(b for _, b in data.date_range.values())},
            "settings": {"learning_rate": node.learning_rate, "batch_size": node.batch_size,
                         "context_len": node.context_len, "horizon": node.horizon,
                         "random_fraction": node.random_fraction, "forecast_probability": node.forecast_probability,
                         "processes": acc.num_processes, "gradient_accumulation": acc.gradient_accumulation_steps,
                         "mixed_precision": str(acc.mixed_precision), "seed": self.seed,
                         "nonfinite": self.nonfinite},
            "config": config, "history": state.history, "val_history": state.val_history,
        }
        self.peft_model = acc.unwrap_model(ddp_model)
        acc.free_memory()
        self._write_outputs(name, metrics)
        self._update_dag(dag, name, status="done", val_loss_start=val_start, val_loss_end=val_end,
                         retention=retention, error=None)
        if self.write_cards and acc.is_main_process:
            from .cards import write_node_card

            with self.run_folder.lock():  # it also rewrites the run's index card and plot
                write_node_card(self.output_dir, name)
        _crash_point("before_complete", name)
        if acc.is_main_process:
            self.run_folder.mark_complete(name)
        acc.wait_for_everyone()
        logger.info(f"node {name}: done, train loss {_fmt_loss(metrics['train_loss_start'])} -> "
                    f"{_fmt_loss(metrics['train_loss_end'])}, val loss {val_start:.4f} -> {val_end:.4f} "
                    f"in {metrics['wall_time_s']} s", main_process_only=True)
        return metrics

    # ------------------------------------------------------------------ files
    def _write_outputs(self, name: str, metrics: dict) -> None:
        acc = self.accelerator
        folder = self.node_dir(name)
        if acc.is_main_process:
            staging = os.path.join(folder, ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            with _writing(f"the adapter of node {name!r} to {folder}"):
                self.peft_model.save_pretrained(staging, selected_adapters=[name], save_embedding_layers=False)
            saved = os.path.join(staging, name) if os.path.isdir(os.path.join(staging, name)) else staging
            for filename in ADAPTER_FILES:
                atomic_move_file(os.path.join(saved, filename), os.path.join(folder, filename))
            shutil.rmtree(staging, ignore_errors=True)
            _crash_point("adapter_written", name)
            atomic_write_json(os.path.join(folder, "metrics.json"), metrics)
        acc.wait_for_everyone()

    def _save_checkpoint(self, name: str, optimizer, state: NodeState, config: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            folder = self.node_dir(name)
            staging = os.path.join(folder, ".checkpoint.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            adapter = get_peft_model_state_dict(acc.unwrap_model(self.peft_model), adapter_name=name)
            with _writing(f"the step-{state.step} checkpoint of node {name!r} to {staging}"):
                atomic_save_safetensors(os.path.join(staging, "adapter.safetensors"), adapter)
                _crash_point("checkpoint_mid", name, state.step)
                tensors, meta = _optimizer_tensors(optimizer)
                atomic_save_safetensors(os.path.join(staging, "optimizer.safetensors"), tensors)
            atomic_write_json(os.path.join(staging, "trainer_state.json"),
                              {"step": state.step, "history": state.history, "val_history": state.val_history,
                               "skipped_nonfinite": state.skipped_nonfinite, "optimizer": meta, "config": config})
            atomic_replace_dir(staging, os.path.join(folder, "checkpoint"))
            _crash_point("checkpoint_written", name, state.step)
        acc.wait_for_everyone()

    def _load_checkpoint(self, name: str, optimizer, config: dict) -> NodeState:
        folder = os.path.join(self.node_dir(name), "checkpoint")
        if not (self.resume and os.path.isfile(os.path.join(folder, "trainer_state.json"))):
            return NodeState()
        saved = read_json(os.path.join(folder, "trainer_state.json"))
        try:
            set_peft_model_state_dict(self.peft_model, load_file(os.path.join(folder, "adapter.safetensors")),
                                      adapter_name=name)
            optimizer.load_state_dict(_optimizer_state(load_file(os.path.join(folder, "optimizer.safetensors")),
                                                       saved["optimizer"]))
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. n_loops changed under --allow_changed_config
            changes = "; ".join(_config_changes(saved.get("config") or {}, config)[:3]) or "unknown changes"
            raise CurriculumError(f"node {name!r}: its step-{saved.get('step')} checkpoint in {folder} does not fit "
                                  f"the current settings ({changes}): {str(err).splitlines()[0]}; delete that "
                                  "checkpoint folder to restart the node") from None
        node = self.curriculum.node(name)
        for group in optimizer.param_groups:  # the saved state brings back the old rate: the node's own holds
            group["lr"], group["weight_decay"] = node.learning_rate, node.weight_decay
        logger.info(f"node {name}: resuming from step {saved['step']}", main_process_only=True)
        return NodeState(step=saved["step"], history=saved["history"], val_history=saved["val_history"],
                         skipped_nonfinite=saved.get("skipped_nonfinite", 0))

    def _all_finite(self, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer) -> bool:
        """Whether this step's loss and every gradient are finite, agreed by all processes.

        Under fp16 the gradients are unscaled first (GradScaler records their overflow for its `step`). While the
        scale is above 1, a non-finite gradient is an overflow of the scaled backward pass: GradScaler skips that step
        and lowers the scale, so it is no training failure. At a scale of 1 or less nothing was amplified, and a
        non-finite gradient is real.
        """
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(optimizer.optimizer)  # true gradients from here on; step() does not unscale again
        bad_grads = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
        if bad_grads and scaler is not None and scaler.get_scale() > 1:
            bad_grads = False  # GradScaler's overflow: skipped and backed off in optimizer.step()
        bad = not bool(torch.isfinite(loss).all()) or bad_grads
        if self.accelerator.num_processes > 1:
            bad = float(self.accelerator.reduce(torch.tensor(float(bad), device=self.accelerator.device))) > 0
        return not bad

    def _write_final(self, dag: dict) -> None:
        sink = self.curriculum.sink()
        if self.accelerator.is_main_process and self.is_complete(sink):
            self.run_folder.write_final(sink)


def _config_changes(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """`key old -> new` for every setting that differs (nested objects by dotted key, in the current order)."""
    changes = []
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = recorded.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {old!r} -> {new!r}")
    return changes


def summary(dag: dict, output_dir: str) -> str:
    """What the run prints at the end: every node's validation loss and every join's retention."""
    lines = [f"GWM curriculum finished: {output_dir}", "", "node         status  val loss start -> end"]
    for name in dag["order"]:
        entry = dag["nodes"][name]
        start, end = entry.get("val_loss_start"), entry.get("val_loss_end")
        losses = f"{start:.4f} -> {end:.4f}" if start is not None and end is not None else "-"
        lines.append(f"{name:<12} {entry['status']:<7} {losses}")
    for name in dag["order"]:
        retention = dag["nodes"][name].get("retention")
        if retention:
            lines.append(f"\njoin {name}: merged adapter on each parent's validation data, before training")
            for parent, r in retention.items():
                lines.append(f"  {parent:<12} parent {r['parent_val_loss']:.4f}  merged {r['merged_val_loss']:.4f}")
    lines.append(f"\nadapters and model cards: {output_dir}/<node>/ (final: {output_dir}/final/)")
    return "\n".join(lines)


logging.getLogger("modeling_gwm").addHandler(logging.NullHandler())
