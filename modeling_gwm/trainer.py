"""DAG curriculum training with accelerate: one frozen base per process, one adapter per node.

`run()` plans (which nodes, checks before any work, dag.json) and trains the nodes in topological order; `train_node`
takes one node through numbered phases: (1) data, (2) adapter start state, (3) prepare, (4) loop, (5) evaluate,
(6) write. Batches are derived from (seed, node, step) alone, so a resumed or multi-process run sees exactly the
batches an uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checkpoint
from .canvas import season_period
from .checkpoint import NodeState
from .configuration_gwm import DEFAULT_BASE
from .curriculum import Curriculum, CurriculumError, MergeSpec, TrainingNode
from .data import CanvasDataset, DataError, DataSource, NodeData, build_node_data, collate_canvas
from .faults import crash_point, inject_nan
from .io_utils import atomic_move_file, atomic_write_json
from .loop import LoopConfig
from .masking import sample_target_mask
from .merging import align_fields, merge_adapters
from .modeling_gwm import GWMModel
from .run_folder import ADAPTER_FILES, NodeBusyError, RunFolder, node_lock
from .training_args import TrainingArguments

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


def _step_seed(seed: int, node_index: int, step: int) -> int:
    return (seed * 1_000_003 + node_index * 7_919 + step) % (2**63 - 1)


@dataclass
class NodeRun:
    """What the phases of one node's training hand on to each other."""

    name: str
    node: TrainingNode
    index: int  # the node's place in the curriculum's order: part of every step's batch seed
    data: NodeData
    child_fields: list[str]  # the adapter's field slots
    field_ids: torch.Tensor  # (n_data_fields,) the adapter slot of each data field
    started: float
    steps: int = 0
    config: dict = field(default_factory=dict)
    retention: dict | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    model: torch.nn.Module | None = None  # the PEFT model as accelerate prepared it
    state: NodeState = field(default_factory=NodeState)
    progress: tqdm | None = None


class DAGCurriculumTrainer:
    """Train every node of a DAG curriculum in topological order on one shared frozen base.

    The seed's API: `DAGCurriculumTrainer(nodes=dag, data_sources=sources, backbone="cogvideox",
    pretrained_model_id="THUDM/CogVideoX-2b", device="cuda").run()`; `training/dag_train.py` builds the same
    trainer from a YAML curriculum (`curriculum=load_curriculum(path)`) and a parsed `TrainingArguments`.
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
        args: TrainingArguments | None = None,
        model_config: dict | None = None,
        write_cards: bool = True,
        **kwargs,
    ):
        """`args`, or its fields as keywords (`output_dir=...`, `max_steps=...`, `only_nodes=[...]`), which win."""
        if curriculum is None:
            if not nodes or data_sources is None:
                raise CurriculumError("DAGCurriculumTrainer needs nodes and data_sources, or a curriculum")
            curriculum = Curriculum(nodes=list(nodes), sources=dict(data_sources), model=dict(model_config or {}))
        overrides = {"backbone": backbone, "pretrained_model_id": pretrained_model_id}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        self.args = args = dataclasses.replace(args or TrainingArguments(), **kwargs)
        self.curriculum = curriculum
        self.model_config = {**curriculum.model, **(model_config or {})}
        if args.backbone is not None:
            self.model_config["backbone"] = args.backbone
        if args.pretrained_model_id is not None:
            self.model_config["base"] = args.pretrained_model_id
        self.run_folder = RunFolder(args.output_dir)
        self.output_dir = str(self.run_folder.path)
        self.write_cards = write_cards
        self._check_args()
        log_with = None if args.report_to in (None, "none") else args.report_to
        if log_with and not _TRACKERS.get(log_with, lambda: True)():
            raise CurriculumError(f"--report_to {log_with} needs the {log_with} package: pip install {log_with}")
        # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA starts N torchrun processes;
        # accelerate only joins them into one gloo (MULTI_CPU) group when told to use the CPU, else each process
        # would silently train alone on the full batch.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        use_cpu = device == "cpu" or (device is None and launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(
            cpu=use_cpu, mixed_precision=args.mixed_precision, log_with=log_with,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            project_dir=os.path.join(self.output_dir, "runs"),
        )
        self.model = None
        self.peft_model = None

    def _check_args(self) -> None:
        args = self.args
        if args.nonfinite not in ("stop", "skip"):
            raise CurriculumError(f"nonfinite must be 'stop' or 'skip', got {args.nonfinite!r}")
        if args.push_to_hub and not args.hub_model_id:
            raise CurriculumError("--push_to_hub needs --hub_model_id (e.g. user/gwm-demo)")
        for name in args.only_nodes or []:
            if name not in {n.name for n in self.curriculum.nodes}:
                raise CurriculumError(f"{self.curriculum.where}: --nodes names unknown node {name!r}")

    # ------------------------------------------------------------------ plan
    def selected_nodes(self) -> list[str]:
        order = self.curriculum.order()
        if not self.args.only_nodes:
            return order
        wanted = set(self.args.only_nodes)
        if self.args.with_ancestors:
            for name in self.args.only_nodes:
                wanted.update(self.curriculum.ancestors(name))
        return [n for n in order if n in wanted]

    def node_dir(self, name: str) -> str:
        return str(self.run_folder.node_dir(name))

    def is_complete(self, name: str) -> bool:
        return self.run_folder.is_complete(name)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        acc = self.accelerator
        set_seed(self.args.seed)
        if not show_progress():
            import datasets

            datasets.disable_progress_bars()  # its "Generating train split" bars too
        selected = self.selected_nodes()
        dag = self._start_run(selected)
        if acc.log_with:
            acc.init_trackers("gwm", config={"seed": self.args.seed,
                                             **{k: str(v) for k, v in self.model_config.items()}})
        for name in selected:
            if self.is_complete(name):
                logger.info(f"node {name}: complete in {self.node_dir(name)}, skipped", main_process_only=True)
                continue
            self._check_parents_ready(name)
            with self._claim_node(name):
                if self.is_complete(name):  # another job finished it meanwhile
                    continue
                self.train_node(name, dag)
            crash_point("node_done", name)
        self._write_final(dag)
        if acc.log_with:
            acc.end_training()
        if self.args.push_to_hub and acc.is_main_process:
            from .hub import push_curriculum

            url = push_curriculum(self.output_dir, self.args.hub_model_id, token=self.args.hub_token)
            logger.info(f"pushed the curriculum to {url}", main_process_only=True)
        acc.wait_for_everyone()
        return self._load_dag()

    def _start_run(self, selected: list[str]) -> dict:
        """Every check that needs no training, then dag.json brought up to date; returns it."""
        requested = set(self.args.only_nodes or selected)
        if not self.args.resume:
            done = [n for n in selected if n in requested and self.is_complete(n)]
            if done:
                raise CurriculumError(f"{self.output_dir} already holds trained node(s) {done}: pass --resume to keep "
                                      "and skip them, or choose a new --output_dir")
        self.preflight([n for n in selected if not self.is_complete(n)])
        if self.args.resume:
            self.check_unchanged(selected)
        os.makedirs(self.output_dir, exist_ok=True)
        if not self.accelerator.is_main_process:
            return self._load_dag()
        with self.run_folder.lock():
            dag = self._load_dag()
            self.run_folder.write_dag(dag)
        return dag

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
        recorded = self.run_folder.read_node_json(parent, "adapter_config.json").get("gwm_config") or {}
        ours = {"seed": self.model_config.get("seed", self.args.seed),
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
                  "seed": self.args.seed, "model": {k: os.path.abspath(v) if k == "base" and os.path.isdir(str(v))
                                                    else v for k, v in self.model_config.items()
                                                    if k != "gradient_checkpointing"},
                  "mixed_precision": str(self.accelerator.mixed_precision)}
        return json.loads(json.dumps(config, default=str))

    def check_unchanged(self, selected: list[str]) -> None:
        """Refuse to resume a run whose curriculum or settings changed under it (the result would be a mix).

        Compared: every half-trained node to be continued (its checkpoint's record) and every complete node this job
        keeps or builds on (its metrics.json record). `allow_changed_config` lets the new settings take over.
        """
        if self.args.allow_changed_config:
            return
        to_train = [n for n in selected if not self.is_complete(n)]
        used = set(selected) | {a for n in to_train for a in self.curriculum.ancestors(n)}
        for name in [n for n in self.curriculum.order() if n in used]:
            if self.is_complete(name):
                recorded, state = self.run_folder.read_node_json(name, "metrics.json").get("config"), "was trained"
            elif (saved := checkpoint.read_state(self.run_folder.checkpoint_dir(name))) is not None:
                recorded, state = saved.get("config"), f"is half-trained (step {saved.get('step')})"
            else:
                continue
            if not isinstance(recorded, dict):  # a run from before these records: nothing to compare
                continue
            changes = checkpoint.config_changes(recorded, self.node_config(name))
            if changes:
                shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
                raise CurriculumError(f"{self.curriculum.where}: node {name!r} {state} in {self.node_dir(name)} with "
                                      f"settings that changed since the run started: {shown}; pass "
                                      "--allow_changed_config to continue with the new settings, or use a new "
                                      "--output_dir")

    def _load_dag(self) -> dict:
        """dag.json as on disk, brought up to date with the curriculum (order, kinds, parents, merges, done nodes)."""
        dag = self.run_folder.read_dag()
        dag.setdefault("nodes", {})
        dag.update({"curriculum": self.curriculum.path, "order": self.curriculum.order(), "seed": self.args.seed,
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
            config.setdefault("seed", self.args.seed)
            config["gradient_checkpointing"] = self.args.gradient_checkpointing or config.get("gradient_checkpointing",
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
            for entry in self.run_folder.read_node_json(parent, "adapter_config.json")["fields"]:
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
                              spec=node.merge or MergeSpec(), weights=node.merge_weights(), seed=self.args.seed)

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

    def _val_loss(self, run: NodeRun) -> float:
        return self.evaluate(run.data.val, run.field_ids, run.node.horizon, run.node.eval_windows)

    def _retention(self, name: str, child_fields: list[str]) -> dict:
        """For a join: the merged adapter's loss on each parent's validation data, next to the parent's own."""
        out = {}
        for parent in self.curriculum.node(name).parents:
            node = self.curriculum.node(parent)
            data = self._node_data(parent)
            ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=self.accelerator.device)
            merged = self.evaluate(data.val, ids, node.horizon, node.eval_windows)
            own = self.run_folder.read_node_json(parent, "metrics.json").get("val_loss_end")
            out[parent] = {"parent_val_loss": own, "merged_val_loss": merged,
                           "retention": (own / merged) if own and merged == merged and merged > 0 else None}
        return out

    # ------------------------------------------------------------------ one node, in phases
    def train_node(self, name: str, dag: dict) -> dict:
        """Train one node whose parents are complete; returns its metrics (also in `<node>/metrics.json`)."""
        run = self._load_data(name)  # (1) data
        self._start_adapter(run, dag)  # (2) adapter start state: seeded init, fork copy or join merge; retention
        self._prepare(run)  # (3) optimizer, resume from the checkpoint, accelerate.prepare
        self._loop(run, dag)  # (4) the steps, a checkpoint every `checkpoint_every`
        metrics = self._evaluate_end(run)  # (5) the validation loss at the end; metrics
        self._write(run, dag, metrics)  # (6) adapter, metrics.json, dag.json, card, COMPLETE
        return metrics

    def _load_data(self, name: str) -> NodeRun:
        started = time.time()
        data = self._node_data(name)
        child_fields = self.curriculum.adapter_fields(name)
        field_ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=self.accelerator.device)
        return NodeRun(name=name, node=self.curriculum.node(name), index=self.curriculum.order().index(name),
                       data=data, child_fields=child_fields, field_ids=field_ids, started=started)

    def _start_adapter(self, run: NodeRun, dag: dict) -> None:
        init = self._attach_adapter(run.name, self._field_meta(run.name, run.data))
        run.config = self.node_config(run.name)
        self._update_dag(dag, run.name, status="running", config=run.config)
        start = self.start_state(run.name, init)
        crash_point("merge_done", run.name)
        set_peft_model_state_dict(self.peft_model, start, adapter_name=run.name)
        run.retention = self._retention(run.name, run.child_fields) if run.node.kind == "join" else None

    def _prepare(self, run: NodeRun) -> None:
        acc, node = self.accelerator, run.node
        run.steps = node.steps if self.args.max_steps is None else min(node.steps, self.args.max_steps)
        run.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(run.params, lr=node.learning_rate, weight_decay=node.weight_decay)
        folder = self.run_folder.checkpoint_dir(run.name)
        resumed = self.args.resume and checkpoint.load(folder, run.name, self.peft_model, optimizer, run.config)
        if resumed:
            run.state = resumed
            for group in optimizer.param_groups:  # the saved state brings back the old rate: the node's own holds
                group["lr"], group["weight_decay"] = node.learning_rate, node.weight_decay
            logger.info(f"node {run.name}: resuming from step {run.state.step}", main_process_only=True)
        if run.state.step == 0:
            run.state.val_history.append({"step": 0, "val_loss": self._val_loss(run)})
        run.model, run.optimizer = acc.prepare(self.peft_model, optimizer)
        run.model.train()
        run.progress = tqdm(total=run.steps, initial=run.state.step, desc=f"{run.name} [{node.kind}]",
                            disable=not (acc.is_local_main_process and show_progress()), dynamic_ncols=True)
        logger.info(f"node {run.name} [{node.kind}]: training steps {run.state.step + 1}-{run.steps}, "
                    f"val loss {run.state.val_history[0]['val_loss']:.4f}", main_process_only=True)

    def _loop(self, run: NodeRun, dag: dict) -> None:
        state = run.state
        while state.step < run.steps:
            train_loss, finite, overflow = self._step(run)
            if not finite:
                self._nonfinite(run, dag, train_loss)
            state.step += 1
            state.history.append({"step": state.step, "train_loss": train_loss} if finite else
                                 {"step": state.step, "train_loss": None, "skipped": "non-finite"})
            if overflow:  # GradScaler's business (it lowered the scale), neither a stop nor a counted skip
                state.history[-1]["skipped"] = "fp16 overflow"
                logger.info(f"node {run.name}: fp16 gradient overflow at step {state.step}, GradScaler skipped the "
                            f"step and lowered the scale to {self.accelerator.scaler.get_scale():g}",
                            main_process_only=True)
            run.progress.update(1)
            run.progress.set_postfix(loss=f"{train_loss:.4f}")
            if self.accelerator.log_with:
                self.accelerator.log({f"{run.name}/train_loss": train_loss}, step=run.index * 1_000_000 + state.step)
            if state.step % run.node.checkpoint_every == 0 and state.step < run.steps:
                state.val_history.append({"step": state.step, "val_loss": self._val_loss(run)})
                self._save_checkpoint(run)
        run.progress.close()

    def _step(self, run: NodeRun) -> tuple[float, bool, bool]:
        """One optimizer step over this process's micro-batches: (train loss, finite, fp16 overflow)."""
        acc, model, optimizer = self.accelerator, run.model, run.optimizer
        sse_step = torch.zeros((), device=acc.device)
        finite, overflow = True, False
        for micro in self._batch(run.data, run.node, run.index, run.state.step):
            with acc.accumulate(model):
                with acc.autocast():
                    position_loss = model(micro["values"], micro["presence"], field_ids=run.field_ids,
                                          target_mask=micro["target_mask"]).position_loss
                scored = micro["target_mask"] & micro["presence"]
                sse = (position_loss.float() * scored).sum()  # summed pinball loss (scaled units)
                sse = inject_nan(sse, run.name, run.state.step + 1)
                scale = acc.num_processes * acc.gradient_accumulation_steps / micro["scored_total"]
                acc.backward(sse * scale)
                if acc.sync_gradients:
                    finite = self._all_finite(sse_step + sse.detach(), run.params, optimizer)
                    crash_point("step", run.name, run.state.step + 1)
                    if finite:
                        optimizer.step()  # under fp16, GradScaler skips a step whose gradients overflowed
                        overflow = acc.scaler is not None and optimizer.step_was_skipped
                    elif acc.scaler is not None:
                        acc.scaler.update()  # the scale backs off even when the guard skips or stops the step
                optimizer.zero_grad()
            sse_step += sse.detach()
            scored_total = micro["scored_total"]
        return float(acc.reduce(sse_step, reduction="sum")) / scored_total, finite, overflow

    def _nonfinite(self, run: NodeRun, dag: dict, train_loss: float) -> None:
        """A NaN/inf step: stop the node (`NonFiniteError`, its last checkpoint kept) or count it as skipped."""
        step, folder = run.state.step + 1, self.node_dir(run.name)
        where = f"node {run.name!r}: non-finite loss or gradient at step {step} (train loss {train_loss})"
        if self.args.nonfinite == "skip":
            logger.warning(f"{where}: step skipped (--nonfinite skip)", main_process_only=True)
            run.state.skipped_nonfinite += 1
            return
        run.progress.close()
        self._update_dag(dag, run.name, status="failed", error=f"non-finite at step {step}")
        last = checkpoint.read_state(self.run_folder.checkpoint_dir(run.name))
        kept = (f"its last good checkpoint (step {last['step']}) is kept in {folder}/checkpoint" if last is not None
                else "it has no checkpoint yet and will restart from its start")
        raise NonFiniteError(f"{where}; stopped: {kept}; lower learning_rate and rerun with --resume, or pass "
                             "--nonfinite skip to skip such steps")

    def _evaluate_end(self, run: NodeRun) -> dict:
        acc, node, state, data = self.accelerator, run.node, run.state, run.data
        val_end = self._val_loss(run)
        state.val_history.append({"step": state.step, "val_loss": val_end})
        return {
            "node": run.name, "kind": node.kind, "parents": node.parents, "steps": state.step,
            "train_loss_start": state.history[0]["train_loss"] if state.history else None,
            "train_loss_end": state.history[-1]["train_loss"] if state.history else None,
            "val_loss_start": state.val_history[0]["val_loss"], "val_loss_end": val_end,
            "wall_time_s": round(time.time() - run.started, 2), "skipped_nonfinite_steps": state.skipped_nonfinite,
            "trainable_params": sum(p.numel() for p in run.params), "n_loops": node.n_loops,
            "fields": data.field_names, "adapter_fields": run.child_fields, "sources": node.sources,
            "date_range": {"start": min(a for a, _ in data.date_range.values()),
                           "end": max(b for _, b in data.date_range.values())},
            "settings": {"learning_rate": node.learning_rate, "batch_size": node.batch_size,
                         "context_len": node.context_len, "horizon": node.horizon,
                         "random_fraction": node.random_fraction, "forecast_probability": node.forecast_probability,
                         "processes": acc.num_processes, "gradient_accumulation": acc.gradient_accumulation_steps,
                         "mixed_precision": str(acc.mixed_precision), "seed": self.args.seed,
                         "nonfinite": self.args.nonfinite},
            "config": run.config, "history": state.history, "val_history": state.val_history,
        }

    def _write(self, run: NodeRun, dag: dict, metrics: dict) -> None:
        acc, name = self.accelerator, run.name
        self.peft_model = acc.unwrap_model(run.model)
        acc.free_memory()
        self._write_outputs(name, metrics)
        self._update_dag(dag, name, status="done", val_loss_start=metrics["val_loss_start"],
                         val_loss_end=metrics["val_loss_end"], retention=run.retention, error=None)
        if self.write_cards and acc.is_main_process:
            from .hub import write_node_card

            with self.run_folder.lock():  # it also rewrites the run's index card and plot
                write_node_card(self.output_dir, name)
        crash_point("before_complete", name)
        if acc.is_main_process:
            self.run_folder.mark_complete(name)
        acc.wait_for_everyone()
        logger.info(f"node {name}: done, train loss {_fmt_loss(metrics['train_loss_start'])} -> "
                    f"{_fmt_loss(metrics['train_loss_end'])}, val loss {metrics['val_loss_start']:.4f} -> "
                    f"{metrics['val_loss_end']:.4f} in {metrics['wall_time_s']} s", main_process_only=True)

    # ------------------------------------------------------------------ training internals
    def _batch(self, data: NodeData, node: TrainingNode, node_index: int, step: int) -> list[dict]:
        """This process's micro-batches of the step's global batch, plus the global count of scored positions."""
        acc = self.accelerator
        world, accumulation = acc.num_processes, acc.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(_step_seed(self.args.seed, node_index, step))
        picks = torch.randint(len(data.train), (node.batch_size,), generator=generator)
        batch = collate_canvas([data.train[int(i)] for i in picks])
        mask = sample_target_mask(batch["presence"], node.horizon, node.random_fraction, node.forecast_probability,
                                  generator=generator)
        scored_total = float((mask & batch["presence"]).sum().clamp_min(1))
        per_process = node.batch_size // world  # preflight checked that it splits
        rows = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
        micro = per_process // accumulation
        out = []
        for k in range(accumulation):
            part = slice(rows.start + k * micro, rows.start + (k + 1) * micro)
            out.append({key: batch[key][part].to(acc.device) for key in ("values", "presence")}
                       | {"target_mask": mask[part].to(acc.device), "scored_total": scored_total})
        return out

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

    # ------------------------------------------------------------------ files
    def _write_outputs(self, name: str, metrics: dict) -> None:
        acc = self.accelerator
        folder = self.node_dir(name)
        if acc.is_main_process:
            staging = os.path.join(folder, ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            with checkpoint.writing(f"the adapter of node {name!r} to {folder}"):
                self.peft_model.save_pretrained(staging, selected_adapters=[name], save_embedding_layers=False)
            saved = os.path.join(staging, name) if os.path.isdir(os.path.join(staging, name)) else staging
            for filename in ADAPTER_FILES:
                atomic_move_file(os.path.join(saved, filename), os.path.join(folder, filename))
            shutil.rmtree(staging, ignore_errors=True)
            crash_point("adapter_written", name)
            atomic_write_json(os.path.join(folder, "metrics.json"), metrics)
        acc.wait_for_everyone()

    def _save_checkpoint(self, run: NodeRun) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            adapter = get_peft_model_state_dict(acc.unwrap_model(self.peft_model), adapter_name=run.name)
            checkpoint.save(self.run_folder.checkpoint_dir(run.name), run.name, run.state, adapter, run.optimizer,
                            run.config)
        acc.wait_for_everyone()

    def _write_final(self, dag: dict) -> None:
        sink = self.curriculum.sink()
        if self.accelerator.is_main_process and self.is_complete(sink):
            self.run_folder.write_final(sink)


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
