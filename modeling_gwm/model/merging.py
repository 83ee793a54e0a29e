"""Join merges: parents' adapters combined as task vectors from their shared seeded init (a model soup).

merged = init + merge_method([parent_i - init], weights). Weights are shares, normalised to sum 1, so `linear` is
exactly the weighted average of the parents (whatever the init); `task_arithmetic` takes them as given,
init + Σ w_i Δ_i, for those who want to add (or, with a negative weight, subtract) skills. The sparsifying methods
come from PEFT's `peft.utils.merge_utils`. Field embeddings are aligned by field *name* first: a field the child
shares with several parents gets their weighted average (shares renormalised over the parents that have it); a
field only one parent has is copied from it (under task_arithmetic: init + that parent's weighted delta).

Merges run on the CPU in fp32 whatever device the state dicts come from (a model on CUDA, files read by
safetensors): one device for every operand, and DARE's random drop comes from the CPU generator, so a merge is the
same on every machine. The result is loaded into a model with PEFT's `set_peft_model_state_dict`, which copies each
tensor onto its parameter's device.

The merge vocabulary a curriculum's join names (`MergeSpec`, `MERGE_METHODS`) lives here; curriculum.py imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# peft is imported where a merge runs, not here: curriculum.py imports MergeSpec from this module and stays light.
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
FIELD_EMBEDDING_KEY = "codec.field_embedding.weight"


def normalised_merge_weights(method: str, weights: list[float] | None, count: int) -> list[float]:
    """The weights a merge really applies: shares summing to 1, except `task_arithmetic`, which sums raw deltas.

    So `linear` with weights [1, 1] is the average of the parents, and `task_arithmetic` with [1, 1] is
    init + Δa + Δb. Callers validate first (a positive sum where weights are shares).
    """
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if method == "task_arithmetic":
        return weights
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class MergeSpec:
    """How a join combines its parents' adapters (task vectors from the shared init, merged with PEFT's merge_utils)."""

    method: str = "linear"
    # One per parent, in parent order (default: equal). Shares, normalised to sum 1, for every method but
    # `task_arithmetic`, which applies them as given: init + Σ w_i Δ_i.
    weights: list[float] | None = None
    density: float = 0.5  # kept fraction for ties / dare_* / magnitude_prune
    majority_sign_method: str = "total"  # ties / dare_ties: "total" or "frequency"


def _merge_tensors(deltas: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec) -> torch.Tensor:
    from peft.utils import merge_utils

    if spec.method in ("linear", "task_arithmetic"):  # the same sum; only the weights' normalisation differs
        return merge_utils.task_arithmetic(deltas, weights)
    if spec.method in ("ties", "dare_ties"):
        return _ties(deltas, weights, spec)
    if spec.method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, spec.density)
    if spec.method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, weights, spec.density)
    raise ValueError(f"unknown merge method {spec.method!r}; valid: {', '.join(MERGE_METHODS)}")


def _ties(deltas: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec) -> torch.Tensor:
    """TIES / DARE-TIES with shares: where the parents' trimmed deltas agree with the elected sign, their weighted
    *average* (Σ w_i Δ_i / Σ w_i over those parents). PEFT's versions divide Σ w_i Δ_i by the count instead, which
    with shares summing to 1 would shrink the merge by the number of parents; with equal shares both agree exactly
    with the paper's disjoint mean. Trimming and sign election are PEFT's own functions."""
    from peft.utils import merge_utils

    if spec.density >= 1:  # nothing to trim (PEFT would warn once per tensor)
        pruned = deltas
    elif spec.method == "ties":
        pruned = [merge_utils.prune(d, spec.density, method="magnitude") for d in deltas]
    else:
        pruned = [merge_utils.prune(d, spec.density, method="random", rescale=True) for d in deltas]
    stacked = torch.stack(pruned)  # (P, *shape)
    mask = merge_utils.calculate_majority_sign_mask(stacked, method=spec.majority_sign_method)
    shares = merge_utils.reshape_weight_task_tensors(stacked, weights) * mask  # (P, 1...) * (P, *shape)
    return (stacked * shares).sum(0) / shares.sum(0).clamp_min(torch.finfo(stacked.dtype).tiny)


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors detached on the CPU (those already there are not copied)."""
    return {key: tensor.detach().cpu() for key, tensor in state.items()}


def align_fields(state: dict[str, torch.Tensor], fields: list[str], target_fields: list[str],
                 init: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reorder a state's field-embedding rows into `target_fields` order (on `init`'s device).

    Returns the aligned state and a (max_fields,) bool tensor telling which rows this state really holds.
    """
    key = next(k for k in state if k.endswith(FIELD_EMBEDDING_KEY))
    table = init[key].clone()  # rows the state does not have keep the init
    rows = state[key].to(table.device)
    has = torch.zeros(table.size(0), dtype=torch.bool, device=table.device)
    for row, name in enumerate(target_fields):
        if name in fields:
            table[row] = rows[fields.index(name)]
            has[row] = True
    table[len(target_fields):] = rows[len(target_fields):]  # unused slots: merged like any weight
    has[len(target_fields):] = True
    return {**state, key: table}, has


def merge_adapters(parents: list[dict[str, torch.Tensor]], parent_fields: list[list[str]], child_fields: list[str],
                   init: dict[str, torch.Tensor], spec: MergeSpec | None = None,
                   weights: list[float] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge parents' adapter state dicts (PEFT keys, no adapter name) into the child's starting state.

    `init` is the shared seeded initialisation the parents started from (a fresh adapter's state); DARE's random
    drop is seeded with `seed`, so a merge is reproducible. `weights` (default `spec.weights`, else equal) are
    normalised to sum 1 unless the method is `task_arithmetic`. The inputs may sit on any devices; the merge runs on
    the CPU and returns CPU tensors (load them with `set_peft_model_state_dict`).
    """
    spec = spec or MergeSpec()
    weights = spec.weights if weights is None else weights
    if weights is not None and len(weights) != len(parents):
        raise ValueError(f"{len(weights)} merge weights for {len(parents)} parents")
    if weights is not None and spec.method != "task_arithmetic" and (min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"{spec.method} merge weights {list(weights)} must be non-negative with a positive sum")
    weights = normalised_merge_weights(spec.method, weights, len(parents))
    for i, state in enumerate(parents):
        if set(state) != set(init):
            missing = sorted(set(init) ^ set(state))[:3]
            raise ValueError(f"parent #{i + 1} adapter does not match the child's layout (differs at {missing})")
        for key, tensor in state.items():
            if tensor.shape != init[key].shape:
                raise ValueError(f"parent #{i + 1} adapter tensor {key} has shape {tuple(tensor.shape)}, the child "
                                 f"expects {tuple(init[key].shape)} (different n_loops or base?)")
    parents, init = [_on_cpu(state) for state in parents], _on_cpu(init)
    aligned, holds = zip(*(align_fields(s, f, child_fields, init) for s, f in zip(parents, parent_fields)))
    with torch.random.fork_rng(devices=[]):  # DARE's random drop, seeded; the caller's generator is left as it was
        torch.default_generator.manual_seed(seed)
        return _merge_aligned(aligned, holds, init, weights, spec)


def _merge_aligned(aligned: tuple[dict[str, torch.Tensor], ...], holds: tuple[torch.Tensor, ...],
                   init: dict[str, torch.Tensor], weights: list[float], spec: MergeSpec) -> dict[str, torch.Tensor]:
    """init + the merged deltas of field-aligned parent states; field rows merge over the parents that hold them."""
    merged = {}
    weight_tensor = torch.tensor(weights, dtype=torch.float32, device=next(iter(init.values())).device)
    for key, start in init.items():
        start = start.float()
        deltas = [state[key].float() - start for state in aligned]
        if key.endswith(FIELD_EMBEDDING_KEY):
            table = start.clone()
            for row in range(start.size(0)):
                owners = [i for i in range(len(aligned)) if holds[i][row]]
                if not owners:
                    continue
                row_weights = weight_tensor[owners]
                if len(owners) < len(aligned) and spec.method != "task_arithmetic":
                    # shares over the parents that have the field; if those all weigh 0, an even split among them
                    total = row_weights.sum()
                    row_weights = row_weights / total if total > 0 else torch.full_like(row_weights, 1 / len(owners))
                table[row] = start[row] + _merge_tensors([deltas[i][row] for i in owners], row_weights, spec)
            merged[key] = table
        else:
            merged[key] = start + _merge_tensors(deltas, weight_tensor, spec)
    return merged
