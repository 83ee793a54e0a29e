"""DAG curriculum training with accelerate: one frozen base per process, one adapter per node.

`DAGCurriculumTrainer.run()` asks its plan (`self.plan`, a `RunPlan`: which nodes, the checks before any work,
dag.json, node claims) and trains the nodes in topological order; `train_node` takes one node through its training,
top to bottom in one function: data, the adapter's start state, optimizer and resume, the steps, the best state,
the written files. Batches are derived from (seed, node, step) alone, so a resumed or multi-process run sees exactly
the batches an uninterrupted single-process run sees; the learning-rate schedule and the best state so far are part of
every checkpoint, so a resumed node also picks and writes the same step. Callbacks (`callbacks.TrainerCallback`) are
called at fixed moments of a node; the crash and NaN tests install `FaultInjectionCallback` this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..forecasting.pipeline import coverage_error, fit_quantile_scales, mean_pinball, scale_quantiles
from ..io_utils import atomic_move_file, atomic_write_json, writing
from ..model.canvas import season_period
from ..model.configuration_gwm import DEFAULT_BASE
from ..model.data import CanvasDataset, DataSource, NodeData, collate_canvas
from ..model.loop import LoopConfig
from ..model.loop.config import QUANTILE_SCALE_KEY, without_calibration
from ..model.merging import MergeSpec, align_fields, merge_adapters
from ..model.modeling_gwm import GWMModel
from ..output_paths import check_run_contents
from ..run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_FILE,
    CHECKSUM_KEY,
    COMPLETE_MARKER,
    METRICS_FILE,
)
from ..tabular import describe_grid
from . import checkpoint
from .callbacks import TrainerCallback
from .checkpoint import NodeState
from .curriculum import Curriculum, CurriculumError, TrainingNode
from .masking import sample_target_mask
from .plan import RunPlan
from .training_args import TrainingArguments

logger = get_logger(__name__)

# Validation windows a node's quantile calibration is fitted on, at most (spread evenly over its validation data).
CALIBRATION_WINDOWS = 512


def show_progress() -> bool:
    """Progress bars only on a terminal, or when GWM_PROGRESS=1 asks (GWM_PROGRESS=0: never).

    Under a launcher, a scheduler or `> log`, tqdm's carriage-return redraws would fill the log; a log line per node
    (start; end with losses and time) is written instead.
    """
    choice = os.environ.get("GWM_PROGRESS", "").strip()
    return choice == "1" if choice in ("0", "1") else sys.stderr.isatty()


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _span(own: tuple[str, str] | None, inherited: list[str] | None) -> dict:
    """{"span": [first, last]}: the dates a field's adapter has seen (its own data and its parents'), or nothing."""
    spans = [tuple(s) for s in (own, inherited) if s]
    return {"span": [min(a for a, _ in spans), max(b for _, b in spans)]} if spans else {}


def _own_frequency(name: str, data: NodeData, inherited: dict[str, dict]) -> str | None:
    """A field's own frequency: its source's in this node, else the one its parent recorded (an older parent without
    one: the parent's grid)."""
    if name in data.field_frequencies:
        return data.field_frequencies[name]
    entry = inherited.get(name, {})
    return entry.get("own_frequency") or entry.get("frequency")


class NodeNotReadyError(RuntimeError):
    """A node's parents have no complete adapter in the output directory yet."""


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient under `nonfinite="stop"`: the node stops, its last good checkpoint is kept."""


class DAGCurriculumTrainer:
    """Train every node of a DAG curriculum in topological order on one shared frozen base.

    The seed's API: `DAGCurriculumTrainer(nodes=dag, data_sources=sources, backbone="cogvideox",
    pretrained_model_id="THUDM/CogVideoX-2b", device="cuda").run()`; `training/dag_train.py` builds the same
    trainer from a YAML curriculum (`curriculum=load_curriculum(path)`) and a parsed `TrainingArguments`.
    `callbacks`: `TrainerCallback`s, called at the moments `callbacks.py` lists.
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
        callbacks: list[TrainerCallback] | None = None,
        **kwargs,
    ):
        """`args`, or its fields as keywords (`output_dir=...`, `max_steps=...`, `only_nodes=[...]`), which win."""
        if curriculum is None:
            if not nodes or data_sources is None:
                raise CurriculumError("DAGCurriculumTrainer needs nodes and data_sources, or a curriculum")
            curriculum = Curriculum(nodes=list(nodes), sources=dict(data_sources), model=dict(model_config or {}))
        overrides = {"backbone": backbone, "pretrained_model_id": pretrained_model_id}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        self.plan = RunPlan(curriculum, dataclasses.replace(args or TrainingArguments(), **kwargs), model_config,
                            device)
        # the plan's objects the training uses at every turn
        self.args, self.curriculum, self.accelerator = self.plan.args, self.plan.curriculum, self.plan.accelerator
        self.run_folder, self.output_dir = self.plan.run_folder, self.plan.output_dir
        self.callbacks = list(callbacks or [])
        self.write_cards = write_cards
        self.model = None
        self.peft_model = None

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        acc, plan = self.accelerator, self.plan
        set_seed(self.args.seed)
        if not show_progress():
            import datasets

            datasets.disable_progress_bars()  # its "Generating train split" bars too
        selected = plan.selected_nodes()
        dag = plan.start_run(selected)
        if acc.log_with:
            acc.init_trackers("gwm", config={"seed": self.args.seed,
                                             **{k: str(v) for k, v in plan.model_config.items()}})
        for name in selected:
            if plan.is_complete(name):
                plan.check_reusable(name)  # maybe finished by another job since this one started
                logger.info(f"node {name}: complete in {plan.node_dir(name)}, skipped", main_process_only=True)
                continue
            self._check_parents_ready(name)
            with plan.claim_node(name):
                if plan.is_complete(name):  # another job finished it meanwhile
                    plan.check_reusable(name)
                    continue
                state, metrics = self.train_node(name, dag)
            self._call("on_node_end", state, node=name, metrics=metrics)
        plan.write_final()
        if acc.log_with:
            acc.end_training()
        if self.args.push_to_hub and acc.is_main_process:
            from ..hub.hub import push_curriculum

            url = push_curriculum(self.output_dir, self.args.hub_model_id, token=self.args.hub_token)
            logger.info(f"pushed the curriculum to {url}", main_process_only=True)
        acc.wait_for_everyone()
        return plan.load_dag()

    def _check_parents_ready(self, name: str) -> None:
        missing = [p for p in self.curriculum.node(name).parents if not self.plan.is_complete(p)]
        if missing:
            raise NodeNotReadyError(f"node {name!r} cannot start: parent adapter(s) {missing} are not complete in "
                                    f"{self.output_dir} (train them first, e.g. --nodes {' '.join(missing)})")
        for parent in self.curriculum.node(name).parents:
            self.plan.check_reusable(parent)

    def _call(self, event: str, state: NodeState, **kwargs) -> None:
        """Every callback's hook `event` (see callbacks.py), in the order the callbacks were given."""
        for callback in self.callbacks:
            getattr(callback, event)(self.args, state, **kwargs)

    # ------------------------------------------------------------------ one node
    def train_node(self, name: str, dag: dict) -> tuple[NodeState, dict]:
        """Train one node whose parents are complete; returns its final loop state and its metrics (also in
        `<node>/metrics.json`)."""
        acc, args, node = self.accelerator, self.args, self.curriculum.node(name)
        started = time.time()
        index = self.curriculum.order().index(name)  # the node's place in the order: part of every step's batch seed

        # 1. data: the node's windows, and the adapter slot of each of its data fields
        data = self.plan.node_data(name)
        child_fields = self.curriculum.adapter_fields(name)
        field_ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=acc.device)

        # 2. the adapter's start state: the seeded init (a root), the parent's adapter (a fork), their merge (a join)
        init = self._attach_adapter(name, self._field_meta(name, data))
        config = self.plan.node_config(name)  # the settings record: dag.json, every checkpoint, metrics.json
        self.plan.update_dag(dag, name, status="running", config=config)
        set_peft_model_state_dict(self.peft_model, self.start_state(name, init), adapter_name=name)
        state = NodeState()
        self._call("on_node_begin", state, node=name)
        retention = self._retention(name, child_fields) if node.kind == "join" else None

        def log(**values: float | None) -> None:
            """The node's scalars for the run's tracker (`--report_to`), `<node>/<name>` at the node's own step."""
            if acc.log_with:
                acc.log({f"{name}/{k}": v for k, v in values.items() if v is not None},
                        step=index * 1_000_000 + state.step)

        def evaluate() -> None:
            """Validate the current state; `state` keeps it (a detached copy) when it is the best so far."""
            adapter = get_peft_model_state_dict(acc.unwrap_model(self.peft_model), adapter_name=name)
            scores = validation_scores(acc, self.peft_model, data.val, field_ids, node.horizon, node.eval_windows)
            state.offer(state.step, scores["val_loss"], adapter)
            state.val_history[-1]["val_coverage_10_90"] = scores["val_coverage_10_90"]
            log(**scores)

        log(**{f"retention/{parent}": r["retention"] for parent, r in (retention or {}).items()})

        # 3. optimizer and schedule, the checkpoint resumed, accelerate's wrapping
        steps = args.steps or node.steps  # --steps replaces the curriculum's count, --max_steps caps it
        steps = steps if args.max_steps is None else min(steps, args.max_steps)
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        optimizer = adamw(params, node.learning_rate, node.weight_decay)
        scheduler = make_scheduler(optimizer, node, steps)  # stepped here, never by accelerate
        folder = self.run_folder.checkpoint_dir(name)
        if args.resume and (saved := checkpoint.load(folder, name, self.peft_model, optimizer, config, scheduler)):
            state = saved
            set_base_rate(scheduler, node, state.step)  # the saved state brings the old rate: the node's holds
            logger.info(f"node {name}: resuming from step {state.step}", main_process_only=True)
        if state.step == 0:  # the start state (a join: its merge) is the first candidate for the best
            evaluate()
        model, optimizer = acc.prepare(self.peft_model, optimizer)
        model.train()
        progress = tqdm(total=steps, initial=state.step, desc=f"{name} [{node.kind}]",
                        disable=not (acc.is_local_main_process and show_progress()), dynamic_ncols=True)
        logger.info(f"node {name} [{node.kind}]: training steps {state.step + 1}-{steps} on grid "
                    f"{describe_grid(data.frequency, self._source_frequencies(node, data))}, val loss "
                    f"{state.val_history[0]['val_loss']:.4f}", main_process_only=True)

        # 4. the steps: each one global batch from (seed, node, step), split over processes and micro-batches; a
        # validation every `eval_every` steps, a checkpoint every `checkpoint_every`
        ahead = None  # the next step's batch, drawn on the CPU while the device computes this one
        while state.step < steps:
            step, rate = state.step + 1, optimizer.param_groups[0]["lr"]  # rate: this step's on the schedule
            batch = ahead or step_batch(data, node, args.seed, index, state.step)
            ahead, sse_step = None, torch.zeros((), device=acc.device)
            train_loss, finite, overflow, grad_norm = float("nan"), True, False, None  # set at the synced micro-batch
            for micro in micro_batches(acc, batch, node.batch_size):
                with acc.accumulate(model):
                    with acc.autocast():
                        position_loss = model(micro["values"], micro["presence"], field_ids=field_ids,
                                              target_mask=micro["target_mask"]).position_loss
                    scored = micro["target_mask"] & micro["presence"]
                    sse = (position_loss.float() * scored).sum()  # summed pinball loss
                    for callback in self.callbacks:
                        sse = callback.on_micro_batch(args, state, loss=sse, node=name, step=step)
                    acc.backward(sse * (acc.num_processes * acc.gradient_accumulation_steps / batch["scored_total"]))
                    if acc.sync_gradients:
                        if step < steps:
                            ahead = step_batch(data, node, args.seed, index, step)
                        train_loss, finite, overflow, grad_norm = guarded_step(
                            acc, optimizer, params, sse_step + sse.detach(), batch["scored_total"])
                    optimizer.zero_grad()
                sse_step += sse.detach()
            if not finite:
                self._nonfinite(name, step, train_loss, state, dag, progress)
            state.step = step
            with warnings.catch_warnings():  # the schedule follows the step count, as the batches do: a skipped
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # step (non-
                scheduler.step()  # finite, fp16 overflow) spends its rate too, which torch would warn about
            state.history.append({"step": step, "train_loss": train_loss, "learning_rate": rate,
                                  "grad_norm": grad_norm} if finite else
                                 {"step": step, "train_loss": None, "learning_rate": rate, "skipped": "non-finite"})
            if overflow:  # GradScaler's business (it lowered the scale), neither a stop nor a counted skip
                state.history[-1]["skipped"] = "fp16 overflow"
                logger.info(f"node {name}: fp16 gradient overflow at step {step}, GradScaler skipped the step and "
                            f"lowered the scale to {acc.scaler.get_scale():g}", main_process_only=True)
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}")
            log(train_loss=train_loss, learning_rate=rate, grad_norm=grad_norm)
            self._call("on_step_end", state, node=name)
            if step % node.eval_every == 0 and step < steps:
                evaluate()
                patience = node.early_stopping_patience
                if patience is not None and state.evaluations_since_best() >= patience:
                    logger.info(f"node {name}: early stop at step {step}, no better validation loss in {patience} "
                                f"evaluation(s) since step {state.best_step}", main_process_only=True)
                    break
            if step % node.checkpoint_every == 0 and step < steps:
                if acc.is_main_process:
                    adapter = get_peft_model_state_dict(acc.unwrap_model(self.peft_model), adapter_name=name)
                    checkpoint.save(folder, name, state, adapter, optimizer, config, scheduler,
                                    on_file=lambda path: self._call("on_save", state, node=name, path=path))
                    self._call("on_save", state, node=name, path=folder)
                acc.wait_for_everyone()
        progress.close()

        # 5. the written state: the last step validated (unless an early stop just did), the best state back into the
        # adapter; with `calibrate_quantiles`, that state's band calibrated on the node's validation windows
        if state.val_history[-1]["step"] != state.step:
            evaluate()
        if state.best_step is not None and state.best_step != state.step:
            set_peft_model_state_dict(acc.unwrap_model(model), state.best_adapter, adapter_name=name)
            logger.info(f"node {name}: keeps its step-{state.best_step} state (val loss {state.best_val_loss:.4f}; "
                        f"last step {state.val_history[-1]['val_loss']:.4f})", main_process_only=True)
        metrics = {
            "node": name, "kind": node.kind, "parents": node.parents, "steps": state.step,
            "train_loss_start": state.history[0]["train_loss"] if state.history else None,
            "train_loss_end": state.history[-1]["train_loss"] if state.history else None,
            # start: before the first step (a join: right after its merge); end: the last step; best: what is written
            "val_loss_start": state.val_history[0]["val_loss"], "val_loss_end": state.val_history[-1]["val_loss"],
            "best_step": state.best_step, "val_loss_best": state.best_val_loss,
            "val_coverage_10_90_end": state.val_history[-1].get("val_coverage_10_90"),  # share inside the 10-90 % band
            "stopped_early": state.step < steps,
            "wall_time_s": round(time.time() - started, 2), "skipped_nonfinite_steps": state.skipped_nonfinite,
            "trainable_params": sum(p.numel() for p in params), "n_loops": node.n_loops,
            "fields": data.field_names, "adapter_fields": child_fields, "sources": node.sources,
            "date_range": {"start": min(a for a, _ in data.date_range.values()),
                           "end": max(b for _, b in data.date_range.values())},
            "settings": {"learning_rate": node.learning_rate, "batch_size": node.batch_size,
                         "context_len": node.context_len, "horizon": node.horizon,
                         "lr_scheduler_type": node.lr_scheduler_type, "warmup_steps": node.warmup_for(steps),
                         "eval_every": node.eval_every, "early_stopping_patience": node.early_stopping_patience,
                         "random_fraction": node.random_fraction, "forecast_probability": node.forecast_probability,
                         "processes": acc.num_processes, "gradient_accumulation": acc.gradient_accumulation_steps,
                         "mixed_precision": str(acc.mixed_precision), "seed": args.seed, "nonfinite": args.nonfinite},
            "config": config, "history": state.history, "val_history": state.val_history,
        }
        if node.calibrate_quantiles:
            metrics["quantile_calibration"] = self._calibrate(name, data, field_ids, node.horizon)

        # 6. the files: adapter and metrics.json, dag.json, the card; COMPLETE last
        self.peft_model = acc.unwrap_model(model)
        acc.free_memory()
        self._write_outputs(name, state, metrics)
        self.plan.update_dag(dag, name, status="done", val_loss_start=metrics["val_loss_start"],
                             val_loss_end=metrics["val_loss_end"], best_step=metrics["best_step"],
                             val_loss_best=metrics["val_loss_best"], retention=retention, error=None)
        node_dir = self.run_folder.node_dir(name)
        if self.write_cards and acc.is_main_process:
            from ..hub.cards import write_node_card

            with self.run_folder.lock(), writing_card(name, str(node_dir)):  # also the run's index card, plot
                write_node_card(self.output_dir, name)
        self._call("on_save", state, node=name, path=node_dir)
        if acc.is_main_process:
            self.run_folder.mark_complete(name)
        acc.wait_for_everyone()
        logger.info(f"node {name}: done, train loss {_fmt_loss(metrics['train_loss_start'])} -> "
                    f"{_fmt_loss(metrics['train_loss_end'])}, val loss {metrics['val_loss_start']:.4f} -> "
                    f"{metrics['val_loss_end']:.4f} (best {_fmt_loss(metrics['val_loss_best'])} at step "
                    f"{metrics['best_step']}) in {metrics['wall_time_s']} s", main_process_only=True)
        return state, metrics

    def _nonfinite(self, name: str, step: int, train_loss: float, state: NodeState, dag: dict, progress) -> None:
        """A NaN/inf step: stop the node (`NonFiniteError`, its last checkpoint kept) or count it as skipped."""
        where = f"node {name!r}: non-finite loss or gradient at step {step} (train loss {train_loss})"
        if self.args.nonfinite == "skip":
            logger.warning(f"{where}: step skipped (--nonfinite skip)", main_process_only=True)
            state.skipped_nonfinite += 1
            return
        progress.close()
        self.plan.update_dag(dag, name, status="failed", error=f"non-finite at step {step}")
        last = checkpoint.read_state(self.run_folder.checkpoint_dir(name))
        kept = (f"its last good checkpoint (step {last['step']}) is kept in {self.plan.node_dir(name)}/checkpoint"
                if last is not None else "it has no checkpoint yet and will restart from its start")
        raise NonFiniteError(f"{where}; stopped: {kept}; lower learning_rate and rerun with --resume, or pass "
                             "--nonfinite skip to skip such steps")

    def _source_frequencies(self, node: TrainingNode, data: NodeData) -> dict[str, str]:
        """{source: its own frequency} of the sources the node reads, for the log line naming its grid."""
        sources = self.curriculum.sources
        return {s: next(data.field_frequencies[f] for f in sources[s].fields if f in data.field_frequencies)
                for s in node.sources if any(f in data.field_frequencies for f in sources[s].fields)}

    # ------------------------------------------------------------------ model and adapter start state
    def _ensure_model(self) -> GWMModel:
        if self.model is None:
            model_config = self.plan.model_config
            config = {k: v for k, v in model_config.items() if k != "base"}
            config["seed"] = self.plan.init_seed
            config["gradient_checkpointing"] = self.args.gradient_checkpointing or config.get("gradient_checkpointing",
                                                                                              False)
            base = model_config.get("base", DEFAULT_BASE)
            self.model = GWMModel.from_pretrained(base, device=self.accelerator.device, **config)
            logger.info(f"frozen base {self.model.base_source}: {len(self.model.transformer_blocks)} blocks, "
                        f"inner_dim {self.model.inner_dim}", main_process_only=True)
        return self.model

    def _field_meta(self, name: str, data: NodeData) -> list[dict]:
        inherited: dict[str, dict] = {}
        for parent in self.curriculum.node(name).parents:
            for entry in self.run_folder.read_node_json(parent, ADAPTER_CONFIG_FILE)["fields"]:
                inherited.setdefault(entry["name"], without_calibration(entry))  # this node fits its own, or none
        # "frequency": the grid this node trained on, so forecasting puts a history on the same grid; "own_frequency":
        # the field's source's own (a quarterly field on a weekly grid), so its forecast comes out on its own calendar
        lost = [f for f in self.curriculum.adapter_fields(name) if f not in data.stats and f not in inherited]
        if lost:
            raise CurriculumError(f"{self.curriculum.where}: node {name!r}: field(s) {lost} should come from parent(s) "
                                  f"{self.curriculum.node(name).parents}, whose adapters in {self.output_dir} do not "
                                  "hold them (the curriculum changed after they were trained); retrain those parents "
                                  "or use a new --output_dir")
        return [{**(data.stats[f].to_dict() if f in data.stats else inherited[f]), "frequency": data.frequency,
                 "own_frequency": _own_frequency(f, data, inherited),
                 **_span(data.date_range.get(f), inherited.get(f, {}).get("span"))}
                for f in self.curriculum.adapter_fields(name)]

    def _attach_adapter(self, name: str, fields_meta: list[dict]) -> dict[str, torch.Tensor]:
        """Add the node's adapter (fresh = the shared seeded init), drop all others; returns the init state on the CPU,
        where parents' files are read and merges run (`set_peft_model_state_dict` copies it onto the model's device)."""
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
        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _parent_state(self, parent: str) -> tuple[dict[str, torch.Tensor], list[str]]:
        path = self.run_folder.node_dir(parent) / ADAPTER_WEIGHTS_FILE
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CurriculumError(f"node {parent!r}: its adapter {path} is unreadable ({str(err).splitlines()[0]}); "
                                  f"restore it, or delete {path.parent / COMPLETE_MARKER} to train the node "
                                  "again") from None
        return state, self.run_folder.adapter_fields(parent)

    def start_state(self, name: str, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Root: the seeded init. Fork: the parent's adapter. Join: the weighted merge of the parents. On the CPU."""
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

    # ------------------------------------------------------------------ evaluation and calibration
    def evaluate(self, dataset: CanvasDataset, field_ids: torch.Tensor, horizon: int, max_windows: int) -> float:
        """The current adapter's held-out forecast loss on `dataset` (see `validation_loss`)."""
        return validation_loss(self.accelerator, self.peft_model, dataset, field_ids, horizon, max_windows)

    def _retention(self, name: str, child_fields: list[str]) -> dict:
        """For a join: the merged adapter's loss on each parent's validation data, next to the parent's own."""
        out = {}
        for parent in self.curriculum.node(name).parents:
            node = self.curriculum.node(parent)
            data = self.plan.node_data(parent)
            ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=self.accelerator.device)
            merged = self.evaluate(data.val, ids, node.horizon, node.eval_windows)
            recorded = self.run_folder.read_node_json(parent, METRICS_FILE)
            own = recorded.get("val_loss_best", recorded.get("val_loss_end"))  # the parent's written adapter
            out[parent] = {"parent_val_loss": own, "merged_val_loss": merged,
                           "retention": (own / merged) if own and merged == merged and merged > 0 else None}
        return out

    def _calibrate(self, name: str, data: NodeData, field_ids: torch.Tensor, horizon: int) -> dict:
        """Fit the written state's quantile calibration on the node's validation windows and record the factors in
        the adapter's fields (adapter_config.json); a field with too few validation targets gets none."""
        fitted = calibrate_quantiles(self.accelerator, self.peft_model, data.val, field_ids, horizon, data.field_names)
        for entry in self.peft_model.peft_config[name].fields:
            entry.pop(QUANTILE_SCALE_KEY, None)
            if fitted["scales"].get(entry["name"]) is not None:
                entry[QUANTILE_SCALE_KEY] = fitted["scales"][entry["name"]]
        logger.info(f"node {name}: quantiles calibrated on its validation windows, pinball loss "
                    f"{_fmt_loss(fitted['pinball_before'])} -> {_fmt_loss(fitted['pinball_after'])}",
                    main_process_only=True)
        return fitted

    # ------------------------------------------------------------------ files
    def _write_outputs(self, name: str, state: NodeState, metrics: dict) -> None:
        """The node's adapter files, then metrics.json with the adapter's checksum (the main process writes)."""
        acc = self.accelerator
        folder = self.run_folder.node_dir(name)
        if acc.is_main_process:
            check_run_contents(self.output_dir, [name], self.run_folder.given)  # links made since the run started
            staging = folder / ".staging"
            shutil.rmtree(staging, ignore_errors=True)
            with writing(f"the adapter of node {name!r} to {folder}"):
                self.peft_model.save_pretrained(str(staging), selected_adapters=[name], save_embedding_layers=False)
            saved = staging / name if (staging / name).is_dir() else staging
            for filename in ADAPTER_FILES:
                atomic_move_file(str(saved / filename), str(folder / filename))
            shutil.rmtree(staging, ignore_errors=True)
            self._call("on_save", state, node=name, path=folder / ADAPTER_WEIGHTS_FILE)
            metrics[CHECKSUM_KEY] = self.run_folder.adapter_sha256(name)  # checked when a child or --resume reads it
            atomic_write_json(str(folder / METRICS_FILE), metrics)
        acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------- the steps
def step_seed(seed: int, node_index: int, step: int) -> int:
    return (seed * 1_000_003 + node_index * 7_919 + step) % (2**63 - 1)


def step_batch(data: NodeData, node: TrainingNode, seed: int, node_index: int, step: int) -> dict:
    """The global batch of the step after `step` on the CPU: its windows, target mask and count of scored positions,
    drawn from (seed, node, step) alone with a CPU generator (the same batch on every machine and device)."""
    generator = torch.Generator().manual_seed(step_seed(seed, node_index, step))
    picks = torch.randint(len(data.train), (node.batch_size,), generator=generator)
    batch = collate_canvas([data.train[int(i)] for i in picks])
    batch["target_mask"] = sample_target_mask(batch["presence"], node.horizon, node.random_fraction,
                                              node.forecast_probability, generator=generator)
    batch["scored_total"] = float((batch["target_mask"] & batch["presence"]).sum().clamp_min(1))
    return batch


def micro_batches(acc: Accelerator, batch: dict, batch_size: int) -> list[dict]:
    """This process's micro-batches of a step's global `batch` (`step_batch`), on the device."""
    world, accumulation = acc.num_processes, acc.gradient_accumulation_steps
    per_process = batch_size // world  # the plan's preflight checked that the batch splits
    rows = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
    micro = per_process // accumulation
    out = []
    for k in range(accumulation):
        part = slice(rows.start + k * micro, rows.start + (k + 1) * micro)
        out.append({key: batch[key][part].to(acc.device) for key in ("values", "presence", "target_mask")})
    return out


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The node's optimizer: AdamW, fused into one kernel per step when the parameters are on CUDA (the default
    implementation elsewhere, so CPU runs are unchanged)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def make_scheduler(optimizer: torch.optim.Optimizer, node: TrainingNode,
                   steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The node's learning-rate schedule over a run of `steps` steps (`transformers.get_scheduler`), stepped once per
    training step: warm-up from 0, then the named decay from the node's learning rate."""
    return get_scheduler(node.lr_scheduler_type, optimizer, num_warmup_steps=node.warmup_for(steps),
                         num_training_steps=steps)


def set_base_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, node: TrainingNode, step: int) -> None:
    """After a resume at `step`: the node's own rate and weight decay, not the checkpoint's (they differ only under
    --allow_changed_config), at that step of the schedule; the same arithmetic as `LambdaLR.step`."""
    scheduler.last_epoch = step  # what the checkpoint's scheduler state holds (a checkpoint without one: set here)
    scheduler.base_lrs = [node.learning_rate] * len(scheduler.optimizer.param_groups)
    for group, schedule in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = node.learning_rate, node.weight_decay
        group["lr"] = node.learning_rate * schedule(scheduler.last_epoch)


def guarded_step(acc: Accelerator, optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor,
                 scored_total: float) -> tuple[float, bool, bool, float | None]:
    """The optimizer step behind the non-finite guard, once a step's gradients are accumulated (and reduced).

    `loss`: this process's summed loss of the step. Returns (train loss over all processes, finite, fp16 overflow,
    gradient norm). A step whose loss or gradients are not finite (`all_finite`) is not taken; under fp16 the
    GradScaler's scale backs off all the same.
    """
    finite = all_finite(acc, loss, params, optimizer)
    grad_norm = gradient_norm(params)
    # read now, while the device waits anyway (the guard synced): the optimizer step is then queued and the host goes
    # on to the next batch without waiting for it
    train_loss = float(acc.reduce(loss, reduction="sum")) / scored_total
    overflow = False
    if finite:
        optimizer.step()  # under fp16, GradScaler skips a step whose gradients overflowed
        overflow = acc.scaler is not None and optimizer.step_was_skipped
    elif acc.scaler is not None:
        acc.scaler.update()  # the scale backs off even when the guard skips or stops the step
    return train_loss, finite, overflow, grad_norm


def all_finite(acc: Accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer) -> bool:
    """Whether this step's loss and every gradient are finite, agreed by all processes.

    Under fp16 the gradients are unscaled first (GradScaler records their overflow for its `step`). While the scale
    is above 1, a non-finite gradient is an overflow of the scaled backward pass: GradScaler skips that step and
    lowers the scale, so it is no training failure. At a scale of 1 or less nothing was amplified, and a non-finite
    gradient is real. One host sync for the whole check (not one per parameter).
    """
    scaler = acc.scaler
    if scaler is not None:
        scaler.unscale_(optimizer.optimizer)  # true gradients from here on; step() does not unscale again
    grads = [p.grad for p in params if p.grad is not None]
    grads_ok = (torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else
                torch.ones((), dtype=torch.bool, device=loss.device))
    loss_ok, grads_ok = torch.stack([torch.isfinite(loss).all(), grads_ok.to(loss.device)]).tolist()  # one sync
    bad_grads = not grads_ok
    if bad_grads and scaler is not None and scaler.get_scale() > 1:
        bad_grads = False  # GradScaler's overflow: skipped and backed off in optimizer.step()
    bad = not loss_ok or bad_grads
    if acc.num_processes > 1:
        bad = float(acc.reduce(torch.tensor(float(bad), device=acc.device))) > 0
    return not bad


def gradient_norm(params: list[torch.nn.Parameter]) -> float | None:
    """The L2 norm of all gradients together (after unscaling and the processes' reduction); None if not finite."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return norm if norm == norm and norm != float("inf") else None


# ---------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validation_loss(acc: Accelerator, model: torch.nn.Module, dataset: CanvasDataset, field_ids: torch.Tensor,
                    horizon: int, max_windows: int) -> float:
    """Forecast loss on held-out positions: the last `horizon` steps of validation windows are hidden; the mean
    pinball loss of the model's quantiles, in each window's scaled units (the training loss)."""
    return validation_scores(acc, model, dataset, field_ids, horizon, max_windows)["val_loss"]


def validation_scores(acc: Accelerator, model: torch.nn.Module, dataset: CanvasDataset, field_ids: torch.Tensor,
                      horizon: int, max_windows: int) -> dict[str, float | None]:
    """`validation_loss` (`val_loss`) and, from the same forward passes, `val_coverage_10_90`: the share of the
    scored targets inside the model's 10-90 % band (0.8 when calibrated; None without those levels)."""
    if len(dataset) == 0:
        return {"val_loss": float("nan"), "val_coverage_10_90": None}
    levels = [float(q) for q in acc.unwrap_model(model).config.quantile_levels]
    band = [levels.index(q) for q in (0.1, 0.9)] if 0.1 in levels and 0.9 in levels else None
    sse, count, inside = 0.0, 0.0, 0.0
    for values, scored, out in validation_forecasts(acc, model, dataset, field_ids, horizon, max_windows):
        sse += float((out.position_loss.float() * scored).sum())
        count += float(scored.sum())
        if band is not None:  # quantiles (windows, time, fields, Q) in the values' units
            low, high = out.quantiles[..., band[0]].float(), out.quantiles[..., band[1]].float()
            inside += float((scored & (values >= low) & (values <= high)).sum())
    return {"val_loss": sse / count if count else float("nan"),
            "val_coverage_10_90": inside / count if count and band is not None else None}


@torch.no_grad()
def validation_forecasts(acc: Accelerator, model: torch.nn.Module, dataset: CanvasDataset, field_ids: torch.Tensor,
                         horizon: int, max_windows: int):
    """The model's forecasts of validation windows, up to `max_windows` of them spread evenly, 64 per forward pass:
    yields (values (W, T, F), scored (W, T, F) bool, the model's output), the last `horizon` steps hidden and scored
    where observed in the held-out tail; values and quantiles in the same (normalised) units."""
    picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), max_windows)).round().long().unique()
    was_training = model.training
    model.eval()
    for chunk in picks.split(64):
        batch = collate_canvas([dataset[int(i)] for i in chunk])
        values = batch["values"].to(acc.device)  # (windows, time, fields)
        presence = batch["presence"].to(acc.device)
        target = torch.zeros_like(presence)
        target[:, -horizon:] = True
        with acc.autocast():
            out = model(values, presence, field_ids=field_ids, target_mask=target)
        yield values, target & presence & batch.get("holdout", presence).to(presence.device), out
    model.train(was_training)


def calibrate_quantiles(acc: Accelerator, model: torch.nn.Module, dataset: CanvasDataset, field_ids: torch.Tensor,
                        horizon: int, fields: list[str]) -> dict:
    """Fit each field's quantile calibration on the node's validation windows (all of them, up to
    `CALIBRATION_WINDOWS`): `pipeline.fit_quantile_scales` on the scored targets of that field.

    Returns {"scales": {field: Q factors, or None with too few targets}, and over all those targets, before and after
    calibration: "pinball_before" / "_after" (the mean pinball loss, normalised units) and "coverage_error_before" /
    "_after" (the mean over levels of |share of targets below the level - the level|), and "coverage_10_90_before" /
    "_after" (the share inside the 10-90 % band) when those levels are predicted}.
    """
    levels = [float(q) for q in acc.unwrap_model(model).config.quantile_levels]
    actual: dict[int, list] = {j: [] for j in range(len(fields))}
    predicted: dict[int, list] = {j: [] for j in range(len(fields))}
    if len(dataset):
        for values, scored, out in validation_forecasts(acc, model, dataset, field_ids, horizon, CALIBRATION_WINDOWS):
            quantiles = out.quantiles.float()
            for j in range(len(fields)):
                actual[j].append(values[..., j][scored[..., j]].cpu().double().numpy())
                predicted[j].append(quantiles[..., j, :][scored[..., j]].cpu().double().numpy())
    median = levels.index(0.5)
    scales, before, after = {}, [], []
    for j, name in enumerate(fields):
        y = np.concatenate(actual[j]) if actual[j] else np.zeros(0)
        q = np.concatenate(predicted[j]) if predicted[j] else np.zeros((0, len(levels)))
        scales[name] = fit_quantile_scales(y, q, levels)
        before.append(q)
        after.append(q if scales[name] is None else scale_quantiles(q, np.asarray(scales[name]), median))
    y = np.concatenate([np.concatenate(actual[j]) for j in actual if actual[j]] or [np.zeros(0)])
    record = {"scales": scales}
    for when, parts in (("before", before), ("after", after)):
        q = np.concatenate(parts) if parts else np.zeros((0, len(levels)))
        record[f"pinball_{when}"] = mean_pinball(y, q, levels) if len(y) else None
        record[f"coverage_error_{when}"] = coverage_error(y, q, levels) if len(y) else None
        if len(y) and 0.1 in levels and 0.9 in levels:  # the share inside the 10-90 % band (0.8 when calibrated)
            low, high = q[:, levels.index(0.1)], q[:, levels.index(0.9)]
            record[f"coverage_10_90_{when}"] = float(((y >= low) & (y <= high)).mean())
    return record


@contextlib.contextmanager
def writing_card(name: str, folder: str):
    """A card or plot that cannot be written (disk full, EFBIG) is one line naming the node and its folder."""
    try:
        yield
    except OSError as err:
        raise OSError(f"could not write the model card or loss plot of node {name!r} in {folder}: "
                      f"{err.strerror or str(err).splitlines()[0]}") from None


def summary(dag: dict, output_dir: str) -> str:
    """What the run prints at the end: every node's validation loss and every join's retention."""
    lines = [f"GWM curriculum finished: {output_dir}", "",
             "node         status  val loss start -> last step   written (best) at step"]
    for name in dag["order"]:
        entry = dag["nodes"][name]
        start, end, best = entry.get("val_loss_start"), entry.get("val_loss_end"), entry.get("val_loss_best")
        losses = f"{start:.4f} -> {end:.4f}" if start is not None and end is not None else "-"
        written = f"{best:.4f} at step {entry.get('best_step')}" if best is not None else ""
        lines.append(f"{name:<12} {entry['status']:<7} {losses:<26} {written}")
    for name in dag["order"]:
        # the retention recorded when the join started (dag.json keeps it across --resume); no heading without rows
        rows = {parent: r for parent, r in (dag["nodes"][name].get("retention") or {}).items()
                if isinstance(r, dict) and {r.get("parent_val_loss"), r.get("merged_val_loss")} != {None}}
        if rows:
            lines.append(f"\njoin {name}: merged adapter on each parent's validation data, before training")
            for parent, r in rows.items():
                lines.append(f"  {parent:<12} parent {_fmt_loss(r.get('parent_val_loss'))}  merged "
                             f"{_fmt_loss(r.get('merged_val_loss'))}")
    lines.append(f"\nadapters and model cards: {output_dir}/<node>/ (final: {output_dir}/final/)")
    return "\n".join(lines)


logging.getLogger("modeling_gwm").addHandler(logging.NullHandler())
