"""The inner loop of one node's training: what its phases share (`NodeRun`), the batch of each (seed, node, step), one
optimizer step over micro-batches with the non-finite guard, the learning-rate schedule, the held-out validation loss
and the node's metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoint import NodeState
from .curriculum import TrainingNode
from .data import CanvasDataset, NodeData, collate_canvas
from .faults import crash_point, inject_nan
from .masking import sample_target_mask
from .pipeline import coverage_error, fit_quantile_scales, mean_pinball, scale_quantiles


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    model: torch.nn.Module | None = None  # the PEFT model as accelerate prepared it
    state: NodeState = field(default_factory=NodeState)
    progress: tqdm | None = None
    next_batch: tuple[int, dict] | None = None  # (step, its CPU batch), drawn ahead while the device works


def step_seed(seed: int, node_index: int, step: int) -> int:
    return (seed * 1_000_003 + node_index * 7_919 + step) % (2**63 - 1)


def step_batch(data: NodeData, node: TrainingNode, seed: int, node_index: int, step: int) -> dict:
    """The step's global batch on the CPU: its windows, target mask and count of scored positions, drawn from
    (seed, node, step) alone with a CPU generator (the same batch on every machine and device)."""
    generator = torch.Generator().manual_seed(step_seed(seed, node_index, step))
    picks = torch.randint(len(data.train), (node.batch_size,), generator=generator)
    batch = collate_canvas([data.train[int(i)] for i in picks])
    batch["target_mask"] = sample_target_mask(batch["presence"], node.horizon, node.random_fraction,
                                              node.forecast_probability, generator=generator)
    batch["scored_total"] = float((batch["target_mask"] & batch["presence"]).sum().clamp_min(1))
    return batch


def micro_batches(acc: Accelerator, data: NodeData, node: TrainingNode, seed: int, node_index: int,
                  step: int, batch: dict | None = None) -> list[dict]:
    """This process's micro-batches of the step's global batch (`batch`, else drawn here), on the device, plus the
    global count of scored positions."""
    world, accumulation = acc.num_processes, acc.gradient_accumulation_steps
    batch = batch or step_batch(data, node, seed, node_index, step)
    mask, scored_total = batch["target_mask"], batch["scored_total"]
    per_process = node.batch_size // world  # the trainer's preflight checked that the batch splits
    rows = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
    micro = per_process // accumulation
    out = []
    for k in range(accumulation):
        part = slice(rows.start + k * micro, rows.start + (k + 1) * micro)
        out.append({key: batch[key][part].to(acc.device) for key in ("values", "presence")}
                   | {"target_mask": mask[part].to(acc.device), "scored_total": scored_total})
    return out


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


def gradient_norm(params: list[torch.nn.Parameter]) -> float | None:
    """The L2 norm of all gradients together (after unscaling and the processes' reduction); None if not finite."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return norm if norm == norm and norm != float("inf") else None


def training_step(acc: Accelerator, run: NodeRun, seed: int) -> tuple[float, bool, bool, float | None]:
    """One optimizer step over this process's micro-batches: (train loss, finite, fp16 overflow, gradient norm)."""
    model, optimizer, step = run.model, run.optimizer, run.state.step + 1
    sse_step = torch.zeros((), device=acc.device)
    finite, overflow, train_loss, grad_norm = True, False, float("nan"), None
    ahead = run.next_batch if run.next_batch is not None and run.next_batch[0] == run.state.step else None
    run.next_batch = None
    micros = micro_batches(acc, run.data, run.node, seed, run.index, run.state.step, ahead and ahead[1])
    for micro in micros:
        with acc.accumulate(model):
            with acc.autocast():
                position_loss = model(micro["values"], micro["presence"], field_ids=run.field_ids,
                                      target_mask=micro["target_mask"]).position_loss
            scored = micro["target_mask"] & micro["presence"]
            sse = inject_nan((position_loss.float() * scored).sum(), run.name, step)  # summed pinball loss
            scale = acc.num_processes * acc.gradient_accumulation_steps / micro["scored_total"]
            acc.backward(sse * scale)
            if acc.sync_gradients:
                if step < run.steps:  # the next step's windows, assembled on the CPU while the device computes
                    run.next_batch = (step, step_batch(run.data, run.node, seed, run.index, step))
                finite = all_finite(acc, sse_step + sse.detach(), run.params, optimizer)
                grad_norm = gradient_norm(run.params)
                # read now, while the device waits anyway (the guard synced): the optimizer step is then queued and
                # the host goes on to the next batch without waiting for it
                train_loss = float(acc.reduce(sse_step + sse.detach(), reduction="sum")) / micro["scored_total"]
                crash_point("step", run.name, step)
                if finite:
                    optimizer.step()  # under fp16, GradScaler skips a step whose gradients overflowed
                    overflow = acc.scaler is not None and optimizer.step_was_skipped
                elif acc.scaler is not None:
                    acc.scaler.update()  # the scale backs off even when the guard skips or stops the step
            optimizer.zero_grad()
        sse_step += sse.detach()
    return train_loss, finite, overflow, grad_norm


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The node's optimizer: AdamW, fused into one kernel per step when the parameters are on CUDA (the default
    implementation elsewhere, so CPU runs are unchanged)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


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


# Validation windows a node's quantile calibration is fitted on, at most (spread evenly over its validation data).
CALIBRATION_WINDOWS = 512


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
    `CALIBRATION_WINDOWS`): `forecasting.fit_quantile_scales` on the scored targets of that field.

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


def node_metrics(acc: Accelerator, run: NodeRun, seed: int, nonfinite: str) -> dict:
    """metrics.json of a trained node: losses, time, size, fields, settings, its config record and histories."""
    node, state, data = run.node, run.state, run.data
    return {
        "node": run.name, "kind": node.kind, "parents": node.parents, "steps": state.step,
        "train_loss_start": state.history[0]["train_loss"] if state.history else None,
        "train_loss_end": state.history[-1]["train_loss"] if state.history else None,
        # start: before the first step (a join: right after its merge); end: the last step; best: what is written
        "val_loss_start": state.val_history[0]["val_loss"], "val_loss_end": state.val_history[-1]["val_loss"],
        "best_step": state.best_step, "val_loss_best": state.best_val_loss,
        "val_coverage_10_90_end": state.val_history[-1].get("val_coverage_10_90"),  # share inside the 10-90 % band
        "stopped_early": state.step < run.steps,
        "wall_time_s": round(time.time() - run.started, 2), "skipped_nonfinite_steps": state.skipped_nonfinite,
        "trainable_params": sum(p.numel() for p in run.params), "n_loops": node.n_loops,
        "fields": data.field_names, "adapter_fields": run.child_fields, "sources": node.sources,
        "date_range": {"start": min(a for a, _ in data.date_range.values()),
                       "end": max(b for _, b in data.date_range.values())},
        "settings": {"learning_rate": node.learning_rate, "batch_size": node.batch_size,
                     "context_len": node.context_len, "horizon": node.horizon,
                     "lr_scheduler_type": node.lr_scheduler_type, "warmup_steps": node.warmup_for(run.steps),
                     "eval_every": node.eval_every, "early_stopping_patience": node.early_stopping_patience,
                     "random_fraction": node.random_fraction, "forecast_probability": node.forecast_probability,
                     "processes": acc.num_processes, "gradient_accumulation": acc.gradient_accumulation_steps,
                     "mixed_precision": str(acc.mixed_precision), "seed": seed, "nonfinite": nonfinite},
        "config": run.config, "history": state.history, "val_history": state.val_history,
    }
