"""The run-level half of the trainer, without a model: the launch (accelerate), which nodes a job trains, the checks
before any training, each node's settings record, dag.json (the curriculum's view of the run folder) and node claims.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_tensorboard_available, is_trackio_available, is_wandb_available

from ..model.base import resolve_device
from ..model.configuration_gwm import DEFAULT_BASE, RUNTIME_MODEL_KEYS, SEED_MAX
from ..model.data import NodeData, build_node_data
from ..output_paths import check_run_contents
from ..run_folder import ADAPTER_CONFIG_FILE, NodeBusyError, RunFolder, node_lock
from ..tabular import DataError
from . import checkpoint
from .curriculum import Curriculum, CurriculumError
from .training_args import TrainingArguments

_TRACKERS = {"tensorboard": is_tensorboard_available, "trackio": is_trackio_available, "wandb": is_wandb_available}


class RunPlan:
    """A curriculum, its `TrainingArguments` and the run folder they write to, under one `Accelerator`.

    `DAGCurriculumTrainer` holds one as `trainer.plan` and adds the model and the training; nothing here loads a model.
    """

    def __init__(self, curriculum: Curriculum, args: TrainingArguments, model_config: dict | None, device: str | None):
        self.curriculum, self.args = curriculum, args
        self.model_config = {**curriculum.model, **(model_config or {})}
        if args.backbone is not None:
            self.model_config["backbone"] = args.backbone
        if args.pretrained_model_id is not None:
            self.model_config["base"] = args.pretrained_model_id
        model_seed = self.model_config.get("seed", 0)
        if not isinstance(model_seed, int) or isinstance(model_seed, bool) or not isinstance(args.seed, int):
            raise CurriculumError(f"{curriculum.where}: model.seed and --seed must be whole numbers, got "
                                  f"{model_seed!r} and {args.seed!r}")
        # The adapters' initialisation (the shared start of every root): the curriculum's model.seed offset by the
        # run's --seed, so runs with different --seed differ in their init too, and every node of one run shares it.
        self.init_seed = model_seed + args.seed
        self.run_folder = RunFolder(args.output_dir)
        self.output_dir = str(self.run_folder.path)
        if isinstance(args.seed, bool) or not isinstance(args.seed, int) or not 0 <= args.seed <= SEED_MAX:
            raise CurriculumError(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed!r:.60}")
        if args.nonfinite not in ("stop", "skip"):
            raise CurriculumError(f"nonfinite must be 'stop' or 'skip', got {args.nonfinite!r}")
        if args.push_to_hub and not args.hub_model_id:
            raise CurriculumError("--push_to_hub needs --hub_model_id (e.g. user/gwm-demo)")
        for name in args.only_nodes or []:
            if name not in {n.name for n in curriculum.nodes}:
                raise CurriculumError(f"{curriculum.where}: --nodes names unknown node {name!r}")
        log_with = None if args.report_to in (None, "none") else args.report_to
        if log_with and not _TRACKERS.get(log_with, lambda: True)():
            raise CurriculumError(f"--report_to {log_with} needs the {log_with} package: pip install {log_with}")
        # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA starts N torchrun processes;
        # accelerate only joins them into one gloo (MULTI_CPU) group when told to use the CPU, else each process
        # would silently train alone on the full batch.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        device = None if device is None else resolve_device(device).type  # "cuda" without CUDA: one sentence
        use_cpu = device == "cpu" or (device is None and launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(
            cpu=use_cpu, mixed_precision=args.mixed_precision, log_with=log_with,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            project_dir=os.path.join(self.output_dir, "runs"),
        )

    # ------------------------------------------------------------------ which nodes
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

    def node_data(self, name: str) -> NodeData:
        node = self.curriculum.node(name)
        return build_node_data([self.curriculum.sources[s] for s in node.sources], self.curriculum.node_fields(name),
                               node.context_len, val_fraction=node.val_fraction)

    # ------------------------------------------------------------------ checks before any training
    def start_run(self, selected: list[str]) -> dict:
        """Every check that needs no training, then dag.json brought up to date; returns it."""
        requested = set(self.args.only_nodes or selected)
        if not self.args.resume:
            done = [n for n in selected if n in requested and self.is_complete(n)]
            if done:
                raise CurriculumError(f"{self.output_dir} already holds trained node(s) {done}: pass --resume to keep "
                                      "and skip them, or choose a new --output_dir")
        check_run_contents(self.output_dir, [n.name for n in self.curriculum.nodes], self.run_folder.given)
        self.preflight([n for n in selected if not self.is_complete(n)])
        if self.args.resume:
            self.check_unchanged(selected)
        os.makedirs(self.output_dir, exist_ok=True)
        if not self.accelerator.is_main_process:
            return self.load_dag()
        with self.run_folder.lock():
            dag = self.load_dag()
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
                self.node_data(name)  # built again when the node trains: memory stays one node's data
            except DataError as err:
                raise DataError(f"{self.curriculum.where}: node {name!r}: {err}") from None
            for parent in node.parents:
                if self.is_complete(parent):  # trained by an earlier job, maybe elsewhere
                    self._check_same_origin(name, parent)

    def _check_same_origin(self, name: str, parent: str) -> None:
        """Forks and joins need parents grown from this job's seeded init (a join averages their task vectors)."""
        recorded = self.run_folder.read_node_json(parent, ADAPTER_CONFIG_FILE).get("gwm_config") or {}
        ours = {"seed": self.init_seed,
                "backbone": self.model_config.get("backbone", "cogvideox")}
        for key, value in ours.items():
            if key in recorded and recorded[key] != value:
                what = "adapter init seed (model.seed + --seed)" if key == "seed" else f"model {key}"
                raise CurriculumError(f"node {name!r}: parent {parent!r} in {self.node_dir(parent)} was trained with "
                                      f"{what} {recorded[key]!r}, this job uses {value!r}; give every job of a "
                                      "curriculum the same --seed and model settings")

    def node_config(self, name: str) -> dict:
        """Everything that makes a node's adapter what it is, as plain JSON: the node's resolved settings, its fields
        and source declarations, the model, the seed, the mixed precision. Recorded when the node starts (dag.json),
        with each checkpoint and in metrics.json; `--resume` compares it with the curriculum given."""
        node = self.curriculum.node(name)
        settings = {k: v for k, v in node.to_dict().items() if k not in ("name", "description", "checkpoint_every")}
        settings["steps"] = self.args.steps or settings["steps"]  # --steps replaces the curriculum's count
        model = {k: os.path.abspath(v) if k == "base" and os.path.isdir(str(v)) else v
                 for k, v in self.model_config.items() if k not in RUNTIME_MODEL_KEYS}
        config = {**settings, "fields": self.curriculum.node_fields(name),
                  "adapter_fields": self.curriculum.adapter_fields(name),
                  "source_declarations": {s: self.curriculum.sources[s].to_dict() for s in node.sources},
                  "seed": self.args.seed, "model": model, "mixed_precision": str(self.accelerator.mixed_precision)}
        return json.loads(json.dumps(config, default=str))

    def check_unchanged(self, selected: list[str]) -> None:
        """Refuse to resume a run whose curriculum or settings changed under it (the result would be a mix).

        Compared: every half-trained node to be continued (its checkpoint's record) and every complete node this job
        keeps or builds on (its metrics.json record). `allow_changed_config` lets the new settings take over.
        """
        to_train = [n for n in selected if not self.is_complete(n)]
        used = set(selected) | {a for n in to_train for a in self.curriculum.ancestors(n)}
        for name in [n for n in self.curriculum.order() if n in used]:
            if self.is_complete(name):
                self.check_reusable(name)
            elif self.args.allow_changed_config:
                continue
            elif (saved := checkpoint.read_state(self.run_folder.checkpoint_dir(name))) is not None:
                self._refuse_changes(name, saved.get("config"), f"is half-trained (step {saved.get('step')})")

    def check_reusable(self, name: str) -> None:
        """A complete node is kept or built on only if its adapter is the one it wrote (checksum) and, unless
        `allow_changed_config`, its recorded settings are this curriculum's (another job may have trained it)."""
        metrics = self.run_folder.verified_metrics(name)
        if not self.args.allow_changed_config:
            self._refuse_changes(name, metrics.get("config"), "was trained")

    def _refuse_changes(self, name: str, recorded, state: str) -> None:
        if not isinstance(recorded, dict):  # a run from before these records: nothing to compare
            return
        changes = checkpoint.config_changes(recorded, self.node_config(name))
        if changes:
            shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
            raise CurriculumError(f"{self.curriculum.where}: node {name!r} {state} in {self.node_dir(name)} with "
                                  f"settings that changed since the run started: {shown}; pass "
                                  "--allow_changed_config to continue with the new settings, or use a new "
                                  "--output_dir")

    def write_final(self) -> None:
        """final/: a copy of the sink node's folder, once the sink is complete (the main process writes it)."""
        sink = self.curriculum.sink()
        if self.accelerator.is_main_process and self.is_complete(sink):
            self.run_folder.write_final(sink)

    # ------------------------------------------------------------------ dag.json and claims
    def load_dag(self) -> dict:
        """dag.json as on disk, brought up to date with the curriculum (order, kinds, parents, merges, done nodes)."""
        dag = self.run_folder.read_dag()
        dag.setdefault("nodes", {})
        dag.update({"curriculum": self.curriculum.path, "order": self.curriculum.order(), "seed": self.args.seed,
                    "base": self.model_config.get("base", DEFAULT_BASE), "sink": self.curriculum.sink()})
        for name in self.curriculum.order():
            entry = dag["nodes"].setdefault(name, {"status": "pending"})
            entry.update(self.curriculum.dag_entry(name))
            if self.is_complete(name):
                entry["status"] = "done"
        return dag

    def update_dag(self, dag: dict, name: str, **values) -> None:
        dag["nodes"][name].update(values)
        if self.accelerator.is_main_process:
            with self.run_folder.lock():  # another job may be updating other nodes right now
                current = self.load_dag()
                current["nodes"][name].update(dag["nodes"][name])
                self.run_folder.write_dag(current)

    @contextlib.contextmanager
    def claim_node(self, name: str):
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
