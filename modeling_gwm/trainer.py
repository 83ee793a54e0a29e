"""DAG curriculum training with accelerate: one frozen base per process, one adapter per node.

`run()` plans (which nodes, checks before any work, dag.json) and trains the nodes in topological order; `train_node`
takes one node through numbered phases: (1) data, (2) adapter start state, (3) prepare, (4) loop, (5) evaluate and
keep the best state, (6) write. Batches are derived from (seed, node, step) alone, so a resumed or multi-process run
sees exactly the batches an uninterrupted single-process run sees; the learning-rate schedule and the best state so
far are part of every checkpoint, so a resumed node also picks and writes the same step.
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

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checkpoint
from .canvas import season_period
from .configuration_gwm import DEFAULT_BASE
from .curriculum import Curriculum, CurriculumError, TrainingNode
from .data import CanvasDataset, DataSource, NodeData
from .faults import crash_point
from .io_utils import atomic_move_file, atomic_write_json, writing
from .loop import LoopConfig
from .loop.config import QUANTILE_SCALE_KEY, without_calibration
from .merging import MergeSpec, align_fields, merge_adapters
from .modeling_gwm import GWMModel
from .node_loop import (
    NodeRun,
    adamw,
    all_finite,
    calibrate_quantiles,
    make_scheduler,
    node_metrics,
    set_base_rate,
    training_step,
    validation_loss,
    validation_scores,
)
from .output_paths import check_run_contents
from .plan import RunPlan
from .run_folder import ADAPTER_FILES, CHECKSUM_KEY
from .tabular import describe_grid
from .training_args import TrainingArguments

logger = get_logger(__name__)


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


class DAGCurriculumTrainer(RunPlan):
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
        super().__init__(curriculum, dataclasses.replace(args or TrainingArguments(), **kwargs), model_config, device)
        self.write_cards = write_cards
        self.model = None
        self.peft_model = None

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
                self.check_reusable(name)  # maybe finished by another job since this one started
                logger.info(f"node {name}: complete in {self.node_dir(name)}, skipped", main_process_only=True)
                continue
            self._check_parents_ready(name)
            with self._claim_node(name):
                if self.is_complete(name):  # another job finished it meanwhile
                    self.check_reusable(name)
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

    def _check_parents_ready(self, name: str) -> None:
        missing = [p for p in self.curriculum.node(name).parents if not self.is_complete(p)]
        if missing:
            raise NodeNotReadyError(f"node {name!r} cannot start: parent adapter(s) {missing} are not complete in "
                                    f"{self.output_dir} (train them first, e.g. --nodes {' '.join(missing)})")
        for parent in self.curriculum.node(name).parents:
            self.check_reusable(parent)

    # ------------------------------------------------------------------ model
    def _ensure_model(self) -> GWMModel:
        if self.model is None:
            config = {k: v for k, v in self.model_config.items() if k != "base"}
            config["seed"] = self.init_seed
            config["gradient_checkpointing"] = self.args.gradient_checkpointing or config.get("gradient_checkpointing",
                                                                                              False)
            base = self.model_config.get("base", DEFAULT_BASE)
            self.model = GWMModel.from_pretrained(base, device=self.accelerator.device, **config)
            logger.info(f"frozen base {self.model.base_source}: {len(self.model.transformer_blocks)} blocks, "
                        f"inner_dim {self.model.inner_dim}", main_process_only=True)
        return self.model

    def _field_meta(self, name: str, data: NodeData) -> list[dict]:
        inherited: dict[str, dict] = {}
        for parent in self.curriculum.node(name).parents:
            for entry in self.run_folder.read_node_json(parent, "adapter_config.json")["fields"]:
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
        path = self.run_folder.node_dir(parent) / "adapter_model.safetensors"
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CurriculumError(f"node {parent!r}: its adapter {path} is unreadable ({str(err).splitlines()[0]}); "
                                  f"restore it, or delete {path.parent / 'COMPLETE'} to train the node again") from None
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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset: CanvasDataset, field_ids: torch.Tensor, horizon: int, max_windows: int) -> float:
        """The current adapter's held-out forecast loss on `dataset` (see `node_loop.validation_loss`)."""
        return validation_loss(self.accelerator, self.peft_model, dataset, field_ids, horizon, max_windows)

    def _retention(self, name: str, child_fields: list[str]) -> dict:
        """For a join: the merged adapter's loss on each parent's validation data, next to the parent's own."""
        out = {}
        for parent in self.curriculum.node(name).parents:
            node = self.curriculum.node(parent)
            data = self._node_data(parent)
            ids = torch.tensor([child_fields.index(f) for f in data.field_names], device=self.accelerator.device)
            merged = self.evaluate(data.val, ids, node.horizon, node.eval_windows)
            recorded = self.run_folder.read_node_json(parent, "metrics.json")
            own = recorded.get("val_loss_best", recorded.get("val_loss_end"))  # the parent's written adapter
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
        metrics = self._evaluate_end(run)  # (5) the validation loss at the end; the best evaluated state; metrics
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
        self._log(run, **{f"retention/{parent}": r["retention"] for parent, r in (run.retention or {}).items()})

    def _prepare(self, run: NodeRun) -> None:
        acc, node = self.accelerator, run.node
        steps = self.args.steps or node.steps  # --steps replaces the curriculum's count, --max_steps caps it
        run.steps = steps if self.args.max_steps is None else min(steps, self.args.max_steps)
        run.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        optimizer = adamw(run.params, node.learning_rate, node.weight_decay)
        run.scheduler = make_scheduler(optimizer, node, run.steps)  # stepped here, never by accelerate
        folder = self.run_folder.checkpoint_dir(run.name)
        if self.args.resume and (saved := checkpoint.load(folder, run.name, self.peft_model, optimizer, run.config,
                                                          run.scheduler)):
            run.state = saved
            set_base_rate(run.scheduler, node, run.state.step)  # the saved state brings the old rate: the node's holds
            logger.info(f"node {run.name}: resuming from step {run.state.step}", main_process_only=True)
        if run.state.step == 0:  # the start state (a join: its merge) is the first candidate for the best
            self._evaluate(run)
        run.model, run.optimizer = acc.prepare(self.peft_model, optimizer)
        run.model.train()
        run.progress = tqdm(total=run.steps, initial=run.state.step, desc=f"{run.name} [{node.kind}]",
                            disable=not (acc.is_local_main_process and show_progress()), dynamic_ncols=True)
        logger.info(f"node {run.name} [{node.kind}]: training steps {run.state.step + 1}-{run.steps} on grid "
                    f"{describe_grid(run.data.frequency, self._source_frequencies(run))}, val loss "
                    f"{run.state.val_history[0]['val_loss']:.4f}", main_process_only=True)

    def _source_frequencies(self, run: NodeRun) -> dict[str, str]:
        """{source: its own frequency} of the sources the node reads, for the log line naming its grid."""
        sources = self.curriculum.sources
        return {s: next(run.data.field_frequencies[f] for f in sources[s].fields if f in run.data.field_frequencies)
                for s in run.node.sources if any(f in run.data.field_frequencies for f in sources[s].fields)}

    def _loop(self, run: NodeRun, dag: dict) -> None:
        state = run.state
        while state.step < run.steps:
            rate = run.optimizer.param_groups[0]["lr"]  # this step's rate on the schedule
            train_loss, finite, overflow, grad_norm = training_step(self.accelerator, run, self.args.seed)
            if not finite:
                self._nonfinite(run, dag, train_loss)
            state.step += 1
            with warnings.catch_warnings():  # the schedule follows the step count, as the batches do: a skipped
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # step (non-
                run.scheduler.step()  # finite, fp16 overflow) spends its rate too, which torch would warn about
            state.history.append({"step": state.step, "train_loss": train_loss, "learning_rate": rate,
                                  "grad_norm": grad_norm} if finite else
                                 {"step": state.step, "train_loss": None, "learning_rate": rate,
                                  "skipped": "non-finite"})
            if overflow:  # GradScaler's business (it lowered the scale), neither a stop nor a counted skip
                state.history[-1]["skipped"] = "fp16 overflow"
                logger.info(f"node {run.name}: fp16 gradient overflow at step {state.step}, GradScaler skipped the "
                            f"step and lowered the scale to {self.accelerator.scaler.get_scale():g}",
                            main_process_only=True)
            run.progress.update(1)
            run.progress.set_postfix(loss=f"{train_loss:.4f}")
            self._log(run, train_loss=train_loss, learning_rate=rate, grad_norm=grad_norm)
            if state.step % run.node.eval_every == 0 and state.step < run.steps:
                self._evaluate(run)
                patience = run.node.early_stopping_patience
                if patience is not None and state.evaluations_since_best() >= patience:
                    logger.info(f"node {run.name}: early stop at step {state.step}, no better validation loss in "
                                f"{patience} evaluation(s) since step {state.best_step}", main_process_only=True)
                    break
            if state.step % run.node.checkpoint_every == 0 and state.step < run.steps:
                self._save_checkpoint(run)
        run.progress.close()

    def _evaluate(self, run: NodeRun) -> None:
        """Validate the current state; remember it (a detached copy) when it is the best so far."""
        adapter = get_peft_model_state_dict(self.accelerator.unwrap_model(self.peft_model), adapter_name=run.name)
        scores = validation_scores(self.accelerator, self.peft_model, run.data.val, run.field_ids, run.node.horizon,
                                   run.node.eval_windows)
        run.state.offer(run.state.step, scores["val_loss"], adapter)
        run.state.val_history[-1]["val_coverage_10_90"] = scores["val_coverage_10_90"]
        self._log(run, **scores)

    def _log(self, run: NodeRun, **values: float | None) -> None:
        """The node's scalars for the run's tracker (`--report_to`), `<node>/<name>` at the node's own step."""
        if self.accelerator.log_with:
            self.accelerator.log({f"{run.name}/{k}": v for k, v in values.items() if v is not None},
                                 step=run.index * 1_000_000 + run.state.step)

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
        """The last step's validation loss (unless an early stop just measured it), then the best state goes back
        into the adapter: what the node writes; with `calibrate_quantiles`, the band of that state is calibrated on
        the node's validation windows (the factors go into the adapter's fields)."""
        state = run.state
        if state.val_history[-1]["step"] != state.step:
            self._evaluate(run)
        if state.best_step is not None and state.best_step != state.step:
            set_peft_model_state_dict(self.accelerator.unwrap_model(run.model), state.best_adapter,
                                      adapter_name=run.name)
            logger.info(f"node {run.name}: keeps its step-{state.best_step} state (val loss "
                        f"{state.best_val_loss:.4f}; last step {state.val_history[-1]['val_loss']:.4f})",
                        main_process_only=True)
        metrics = node_metrics(self.accelerator, run, self.args.seed, self.args.nonfinite)
        if run.node.calibrate_quantiles:
            metrics["quantile_calibration"] = self._calibrate(run)
        return metrics

    def _calibrate(self, run: NodeRun) -> dict:
        """Fit the written state's quantile calibration on the node's validation windows and record the factors in
        the adapter's fields (adapter_config.json); a field with too few validation targets gets none."""
        fitted = calibrate_quantiles(self.accelerator, self.peft_model, run.data.val, run.field_ids, run.node.horizon,
                                     run.data.field_names)
        for entry in self.peft_model.peft_config[run.name].fields:
            entry.pop(QUANTILE_SCALE_KEY, None)
            if fitted["scales"].get(entry["name"]) is not None:
                entry[QUANTILE_SCALE_KEY] = fitted["scales"][entry["name"]]
        logger.info(f"node {run.name}: quantiles calibrated on its validation windows, pinball loss "
                    f"{_fmt_loss(fitted['pinball_before'])} -> {_fmt_loss(fitted['pinball_after'])}",
                    main_process_only=True)
        return fitted

    def _write(self, run: NodeRun, dag: dict, metrics: dict) -> None:
        acc, name = self.accelerator, run.name
        self.peft_model = acc.unwrap_model(run.model)
        acc.free_memory()
        self._write_outputs(name, metrics)
        self._update_dag(dag, name, status="done", val_loss_start=metrics["val_loss_start"],
                         val_loss_end=metrics["val_loss_end"], best_step=metrics["best_step"],
                         val_loss_best=metrics["val_loss_best"], retention=run.retention, error=None)
        if self.write_cards and acc.is_main_process:
            from .cards import write_node_card

            with self.run_folder.lock(), writing_card(name, self.node_dir(name)):  # also the run's index card, plot
                write_node_card(self.output_dir, name)
        crash_point("before_complete", name)
        if acc.is_main_process:
            self.run_folder.mark_complete(name)
        acc.wait_for_everyone()
        logger.info(f"node {name}: done, train loss {_fmt_loss(metrics['train_loss_start'])} -> "
                    f"{_fmt_loss(metrics['train_loss_end'])}, val loss {metrics['val_loss_start']:.4f} -> "
                    f"{metrics['val_loss_end']:.4f} (best {_fmt_loss(metrics['val_loss_best'])} at step "
                    f"{metrics['best_step']}) in {metrics['wall_time_s']} s", main_process_only=True)

    def _all_finite(self, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer) -> bool:
        """Whether this step's loss and gradients are finite on every process (see `node_loop.all_finite`)."""
        return all_finite(self.accelerator, loss, params, optimizer)

    # ------------------------------------------------------------------ files
    def _write_outputs(self, name: str, metrics: dict) -> None:
        acc = self.accelerator
        folder = self.node_dir(name)
        if acc.is_main_process:
            check_run_contents(self.output_dir, [name], self.run_folder.given)  # links made since the run started
            staging = os.path.join(folder, ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            with writing(f"the adapter of node {name!r} to {folder}"):
                self.peft_model.save_pretrained(staging, selected_adapters=[name], save_embedding_layers=False)
            saved = os.path.join(staging, name) if os.path.isdir(os.path.join(staging, name)) else staging
            for filename in ADAPTER_FILES:
                atomic_move_file(os.path.join(saved, filename), os.path.join(folder, filename))
            shutil.rmtree(staging, ignore_errors=True)
            crash_point("adapter_written", name)
            metrics[CHECKSUM_KEY] = self.run_folder.adapter_sha256(name)  # checked when a child or --resume reads it
            atomic_write_json(os.path.join(folder, "metrics.json"), metrics)
        acc.wait_for_everyone()

    def _save_checkpoint(self, run: NodeRun) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            adapter = get_peft_model_state_dict(acc.unwrap_model(self.peft_model), adapter_name=run.name)
            checkpoint.save(self.run_folder.checkpoint_dir(run.name), run.name, run.state, adapter, run.optimizer,
                            run.config, run.scheduler)
        acc.wait_for_everyone()

    def _write_final(self, dag: dict) -> None:
        sink = self.curriculum.sink()
        if self.accelerator.is_main_process and self.is_complete(sink):
            self.run_folder.write_final(sink)


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
