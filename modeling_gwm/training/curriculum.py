"""The DAG curriculum: nodes, their parents, data and hyper-parameters; parsed, validated and ordered up front.

A node with one parent *forks* (starts from a copy of the parent's adapter), a node with several *joins* (starts
from a weighted merge of its parents), a node without parents is a *root* (starts from the shared seeded init).
"""

from __future__ import annotations

import heapq
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace

import yaml

from hub_cards import lineage_mermaid

from ..io_utils import read_yaml
from ..model.data import DataSource, check_duplicate_fields
from ..model.merging import MERGE_METHODS, MergeSpec, normalised_merge_weights
from ..tabular import DataError, describe_grid, finest_frequency, is_coarser, source_frequency

# Used with fullmatch ("$" would accept a trailing newline). No ".": PEFT keys adapters by name in ParameterDicts.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_NAMES = {"final", "checkpoint", "runs", "logs"}


class CurriculumError(ValueError):
    """A broken curriculum; the message names the file and the node."""


@dataclass
class TrainingNode:
    """One node of the curriculum."""

    name: str
    parents: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    fields: list[str] | None = None  # default: every field of the node's sources
    description: str = ""
    steps: int = 100
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    context_len: int = 24
    horizon: int = 4
    n_loops: int = 3
    random_fraction: float = 0.15
    forecast_probability: float = 0.5
    val_fraction: float = 0.2
    eval_windows: int = 64
    checkpoint_every: int = 25
    # the learning-rate schedule (`transformers.get_scheduler`): warm-up over `warmup_steps` (when given) or
    # ceil(warmup_ratio × steps) steps, then the named decay to the last step
    lr_scheduler_type: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    eval_every: int = 25  # validation every so many steps (and at step 0 and the last); the best step is written
    early_stopping_patience: int | None = None  # stop after so many evaluations without a new best (None: never)
    # fit the written state's band on the node's validation windows (`pipeline.fit_quantile_scales`)
    calibrate_quantiles: bool = False
    merge: MergeSpec | None = None

    @property
    def kind(self) -> str:
        return "root" if not self.parents else ("fork" if len(self.parents) == 1 else "join")

    def merge_weights(self) -> list[float]:
        """The weights the join applies (normalised unless `task_arithmetic`): what dag.json and the cards record."""
        merge = self.merge or MergeSpec()
        return normalised_merge_weights(merge.method, merge.weights, len(self.parents))

    def to_dict(self) -> dict:
        return asdict(self)

    def warmup_for(self, steps: int) -> int:
        """Warm-up steps of a run of `steps` steps (`--max_steps` may shorten the node's own); `constant` has none."""
        if self.lr_scheduler_type == "constant":
            return 0
        return min(steps, self.warmup_steps if self.warmup_steps is not None else math.ceil(self.warmup_ratio * steps))


_NODE_KEYS = {f.name for f in fields(TrainingNode)}
_DEFAULT_KEYS = _NODE_KEYS - {"name", "parents", "sources", "fields", "description", "merge"}


@dataclass
class Curriculum:
    nodes: list[TrainingNode]
    sources: dict[str, DataSource]
    model: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self):
        self.validate()

    @property
    def where(self) -> str:
        return self.path or "curriculum"

    def node(self, name: str) -> TrainingNode:
        return self._by_name[name]

    def children(self, name: str) -> list[str]:
        return [n.name for n in self.nodes if name in n.parents]

    def ancestors(self, name: str) -> list[str]:
        seen: set[str] = set()
        stack = list(self.node(name).parents)
        while stack:
            parent = stack.pop()
            if parent not in seen:
                seen.add(parent)
                stack.extend(self.node(parent).parents)
        return [n for n in self.order() if n in seen]

    def sink(self) -> str:
        """The last node of the order that no other node builds on."""
        return [n for n in self.order() if not self.children(n)][-1]

    def order(self) -> list[str]:
        """Topological order, stable: among ready nodes, the one declared first goes first."""
        key = tuple((n.name, tuple(n.parents)) for n in self.nodes)  # nodes may be edited after validation
        if getattr(self, "_order_cache", (None,))[0] != key:
            self._order_cache = (key, self._topological_order())
        return list(self._order_cache[1])

    def _topological_order(self) -> list[str]:
        """Kahn's algorithm with a heap of declaration indices: linear in nodes and edges (times log n)."""
        waiting = [len(set(n.parents)) for n in self.nodes]
        children: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for parent in set(node.parents):
                children.setdefault(parent, []).append(i)
        ready = [i for i, count in enumerate(waiting) if count == 0]
        heapq.heapify(ready)
        done: list[str] = []
        while ready:
            i = heapq.heappop(ready)
            done.append(self.nodes[i].name)
            for child in children.get(self.nodes[i].name, []):
                waiting[child] -= 1
                if waiting[child] == 0:
                    heapq.heappush(ready, child)
        if len(done) < len(self.nodes):
            placed = set(done)
            cycle = " -> ".join(n.name for n in self.nodes if n.name not in placed)
            raise CurriculumError(f"{self.where}: the parents of nodes {cycle} form a cycle")
        return done

    def node_fields(self, name: str) -> list[str]:
        """Fields a node trains on (from its own sources)."""
        node = self.node(name)
        if node.fields is not None:
            return list(node.fields)
        return [f for s in node.sources for f in self.sources[s].fields]

    def adapter_fields(self, name: str) -> list[str]:
        """The node adapter's field list (codec-slot order): the parents' fields first, then its own new ones."""
        return list(self._all_adapter_fields()[name])

    def _all_adapter_fields(self) -> dict[str, list[str]]:
        """Every node's adapter fields, in one pass in order (a recursion would revisit shared ancestors); cached
        until a node's parents, sources or fields change."""
        key = tuple((n.name, tuple(n.parents), tuple(n.sources), tuple(n.fields or ()), n.fields is None)
                    for n in self.nodes)
        if getattr(self, "_fields_cache", (None,))[0] != key:
            fields_of: dict[str, list[str]] = {}
            for current in self.order():
                out: dict[str, None] = {}
                for parent in self.node(current).parents:
                    out.update(dict.fromkeys(fields_of[parent]))
                out.update(dict.fromkeys(self.node_fields(current)))
                fields_of[current] = list(out)
            self._fields_cache = (key, fields_of)
        return self._fields_cache[1]

    def source_frequency(self, source: str) -> str | None:
        """A source's own frequency: declared, else inferred from its local file as training infers it (`align`);
        None for an undeclared Hub dataset (not downloaded to plan) or a file that cannot say."""
        spec = self.sources[source]
        if spec.frequency or not spec.path:
            return spec.frequency
        try:
            return source_frequency(source, spec.read().index, None)
        except (DataError, OSError):
            return None

    def node_grid(self, name: str) -> tuple[str | None, dict[str, str | None]]:
        """The grid a node trains on, the finest frequency of its sources (`tabular.align`), and each source's own
        frequency; a coarser source keeps its own steps on it (a quarterly one on a weekly grid every ~13 steps)."""
        own = {source: self.source_frequency(source) for source in self.node(name).sources}
        known = [freq for freq in own.values() if freq]
        return (finest_frequency(known) if known else None), own

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        where = self.where
        if not self.nodes:
            raise CurriculumError(f"{where}: the curriculum has no nodes")
        self._by_name: dict[str, TrainingNode] = {}
        for node in self.nodes:
            if not isinstance(node.name, str) or not SAFE_NAME.fullmatch(node.name) or node.name in RESERVED_NAMES:
                raise CurriculumError(f"{where}: node name {node.name!r} is not a safe folder name (letters, digits, "
                                      f"'_' and '-' only, at most 64, not {sorted(RESERVED_NAMES)})")
            if node.name in self._by_name:
                raise CurriculumError(f"{where}: node {node.name!r} is declared twice")
            self._by_name[node.name] = node
        for node in self.nodes:
            _check_node(node, self, where)
        self.order()  # raises on cycles
        max_fields = self._check_model()
        all_fields = self._all_adapter_fields()
        for node in self.nodes:
            fields_needed = len(all_fields[node.name])
            if fields_needed > max_fields:
                raise CurriculumError(f"{where}: node {node.name!r} needs {fields_needed} field slots, more than "
                                      f"model.max_fields={max_fields}")

    def _check_model(self) -> int:
        """The model block as GWMConfig checks it (types, ranges, MODEL_LIMITS), named as the curriculum's; returns
        max_fields."""
        from ..model.configuration_gwm import GWMConfig

        try:
            config = GWMConfig(**{k: v for k, v in self.model.items() if k != "base"})
        except (TypeError, ValueError) as err:
            raise CurriculumError(f"{self.where}: model: {str(err).replace('GWMConfig: ', '')}") from None
        return config.max_fields

    # ------------------------------------------------------------------ views
    def plan(self) -> str:
        """What `--dry_run` and `gwm dag` print: order, kind, parents, merge weights, fields, steps, the grid."""
        lines = [f"Curriculum {self.where}: {len(self.nodes)} nodes, sink {self.sink()!r}"]
        for i, name in enumerate(self.order(), 1):
            node = self.node(name)
            start = "seeded init" if node.kind == "root" else (
                f"copy of {node.parents[0]}" if node.kind == "fork" else
                f"{(node.merge or MergeSpec()).method} merge of " + ", ".join(
                    f"{p}×{w:g}" for p, w in zip(node.parents, node.merge_weights())))
            lines.append(f"{i:>2}. {name} [{node.kind}] from {start}; {node.steps} steps, lr {node.learning_rate:g}, "
                         f"batch {node.batch_size}, n_loops {node.n_loops}, window {node.context_len}/{node.horizon}")
            stop = f", early stop after {node.early_stopping_patience}" if node.early_stopping_patience else ""
            lines.append(f"    schedule {node.lr_scheduler_type} (warm-up {node.warmup_for(node.steps)}), validated "
                         f"every {node.eval_every} steps{stop}; writes its best evaluated step"
                         + ", its quantiles calibrated on its validation windows" * node.calibrate_quantiles)
            lines.append(f"    sources: {', '.join(node.sources)}; trains on {len(self.node_fields(name))} fields: "
                         + ", ".join(self.node_fields(name)))
            grid, own = self.node_grid(name)
            lines.append(f"    grid {describe_grid(grid, own) if grid else 'inferred when training'}"
                         + ("; coarser sources are forecast on their own calendar" if grid and any(
                             is_coarser(freq, grid) for freq in own.values()) else ""))
        return "\n".join(lines)

    def dag_entry(self, name: str) -> dict:
        """The node as dag.json records it: kind, parents, output folder and a join's merge (method, weights,
        density)."""
        node = self.node(name)
        merge = node.merge or MergeSpec()
        return {"kind": node.kind, "parents": node.parents, "output": name, "merge": None if node.kind != "join" else {
            "method": merge.method, "weights": node.merge_weights(), "density": merge.density}}

    def mermaid(self) -> str:
        """The DAG as a mermaid graph, drawn as the model cards draw a run's lineage (`lineage_mermaid`)."""
        return lineage_mermaid({"order": self.order(), "nodes": {name: self.dag_entry(name) for name in self.order()}})


# The schedules of `transformers.get_scheduler` that need nothing but warm-up and total steps (and keep their state
# in plain numbers, so a checkpoint holds it as JSON).
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt")

# Upper bounds far past any sensible run, so a typo (steps: 1e12, batch_size: 10**9) is refused before it allocates
# or loops for days: 10M steps is weeks of the 2B base's steps; a batch or a context past 10,000 canvases or steps
# cannot fit in one accelerator's memory; more loops than 64 re-applies each frozen block beyond any tested depth.
NODE_LIMITS = {"steps": 10_000_000, "batch_size": 10_000, "context_len": 10_000, "n_loops": 64,
               "eval_windows": 100_000}


# Node keys whose value is a list of names (None allowed where the default is None); every other key is checked
# against the type of its default in TrainingNode (bool, int, float: a finite number, str), so a new key is
# type-checked as soon as it is declared there; ranges are checked in `_check_node`.
NAME_LISTS = {"parents": False, "sources": False, "fields": True}


def _check_types(node: TrainingNode, here: str) -> None:
    for spec in fields(TrainingNode):
        key, value, default = spec.name, getattr(node, spec.name), spec.default
        if key in NAME_LISTS:
            if value is None and NAME_LISTS[key]:
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise CurriculumError(f"{here}: {key} must be a list of names, got {value!r:.80}")
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[type(default)]
            raise CurriculumError(f"{here}: {key} must be {kind}, got {value!r:.80}")


def _check_node(node: TrainingNode, curriculum: Curriculum, where: str) -> None:
    here = f"{where}: node {node.name!r}"
    _check_types(node, here)
    for parent in node.parents:
        if parent not in curriculum._by_name:
            raise CurriculumError(f"{here}: unknown parent {parent!r}")
        if parent == node.name:
            raise CurriculumError(f"{here}: a node cannot be its own parent")
    if len(set(node.parents)) != len(node.parents):
        raise CurriculumError(f"{here}: a parent is listed twice")
    if not node.sources:
        raise CurriculumError(f"{here}: no data sources (every node trains on its own data)")
    for source in node.sources:
        if source not in curriculum.sources:
            raise CurriculumError(f"{here}: unknown data source {source!r} (declared: {sorted(curriculum.sources)})")
    own = [f for s in node.sources for f in curriculum.sources[s].fields]
    for f in node.fields or []:
        if f not in own:
            raise CurriculumError(f"{here}: field {f!r} is in none of its sources {node.sources}")
    positive_int = ["steps", "batch_size", "context_len", "n_loops", "eval_windows", "checkpoint_every", "eval_every"]
    for key in positive_int:
        value = getattr(node, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CurriculumError(f"{here}: {key} must be a positive integer, got {value!r}")
        if key in NODE_LIMITS and value > NODE_LIMITS[key]:
            raise CurriculumError(f"{here}: {key} {value} is over the limit of {NODE_LIMITS[key]} "
                                  "(curriculum.NODE_LIMITS)")
    if not isinstance(node.horizon, int) or not 1 <= node.horizon < node.context_len:
        raise CurriculumError(f"{here}: horizon must be an integer in [1, context_len={node.context_len}), "
                              f"got {node.horizon!r}")
    for key in ("learning_rate",):
        value = getattr(node, key)
        if not isinstance(value, (int, float)) or not 0 < value < 10:
            raise CurriculumError(f"{here}: {key} must be a number in (0, 10), got {value!r}")
    for key in ("random_fraction", "forecast_probability", "weight_decay"):
        value = getattr(node, key)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise CurriculumError(f"{here}: {key} must be a number in [0, 1], got {value!r}")
    if not isinstance(node.val_fraction, (int, float)) or not 0 < node.val_fraction < 1:
        raise CurriculumError(f"{here}: val_fraction must be in (0, 1), got {node.val_fraction!r}")
    _check_schedule(node, here)
    if node.merge is not None:
        if node.kind != "join":
            raise CurriculumError(f"{here}: 'merge' is only for nodes with several parents")
        if node.merge.method not in MERGE_METHODS:
            raise CurriculumError(f"{here}: unknown merge method {node.merge.method!r}; "
                                  f"valid: {', '.join(MERGE_METHODS)}")
        if node.merge.weights is not None:
            _check_merge_weights(node.merge.method, node.merge.weights, len(node.parents), here)
        density = node.merge.density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise CurriculumError(f"{here}: merge density must be in (0, 1], got {node.merge.density}")
        if node.merge.majority_sign_method not in ("total", "frequency"):
            raise CurriculumError(f"{here}: majority_sign_method must be 'total' or 'frequency'")
    loops = {curriculum._by_name[p].n_loops for p in node.parents}
    if node.kind == "join" and len(loops | {node.n_loops}) > 1:
        raise CurriculumError(f"{here}: a join needs the same n_loops as all its parents, got {node.n_loops} and "
                              f"{sorted(loops)}")
    if node.kind == "fork" and loops != {node.n_loops}:
        raise CurriculumError(f"{here}: a fork needs its parent's n_loops ({loops.pop()}), got {node.n_loops}")


def _check_schedule(node: TrainingNode, here: str) -> None:
    """The learning-rate schedule and the evaluation settings that pick and stop at the best step."""
    if node.lr_scheduler_type not in LR_SCHEDULES:
        raise CurriculumError(f"{here}: unknown lr_scheduler_type {node.lr_scheduler_type!r}; valid: "
                              f"{', '.join(LR_SCHEDULES)}")
    warmup = node.warmup_steps
    whole = isinstance(warmup, int) and not isinstance(warmup, bool)
    if warmup is not None and (not whole or not 0 <= warmup <= node.steps):
        raise CurriculumError(f"{here}: warmup_steps must be a whole number in [0, steps={node.steps}], got {warmup!r}")
    ratio = node.warmup_ratio
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise CurriculumError(f"{here}: warmup_ratio must be a number in [0, 1), got {ratio!r}")
    patience = node.early_stopping_patience
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        raise CurriculumError(f"{here}: early_stopping_patience must be a positive whole number of evaluations (or "
                              f"null: never stop early), got {patience!r}")


def _check_merge_weights(method: str, weights, count: int, here: str) -> None:
    """Shares (every method but task_arithmetic) must be non-negative with a positive sum; all must be finite."""
    numbers = isinstance(weights, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in weights)
    if not numbers or len(weights) != count or not math.isfinite(sum(abs(x) for x in weights)):
        raise CurriculumError(f"{here}: merge weights {weights!r:.80} must be a list of {count} finite numbers "
                              "(one per parent) with a finite sum")
    if method == "task_arithmetic":
        if not any(weights):
            raise CurriculumError(f"{here}: task_arithmetic merge weights {weights} are all zero")
    elif min(weights) < 0 or sum(weights) <= 0:
        raise CurriculumError(f"{here}: {method} merge weights {weights} must be non-negative with a positive sum "
                              "(they are shares, normalised to sum 1; use method task_arithmetic for signed weights)")


def _node_from_dict(raw: dict, defaults: dict, where: str, index: int) -> TrainingNode:
    if not isinstance(raw, dict):
        raise CurriculumError(f"{where}: node #{index + 1} must be a mapping, got {type(raw).__name__}")
    name = raw.get("name", f"#{index + 1}")
    unknown = sorted(set(raw) - _NODE_KEYS)
    if unknown:
        raise CurriculumError(f"{where}: node {name!r}: unknown key(s) {unknown}; valid: {sorted(_NODE_KEYS)}")
    if "name" not in raw:
        raise CurriculumError(f"{where}: node #{index + 1} has no name")
    values = {**defaults, **raw}
    for key in ("parents", "sources"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
        if values.get(key) is not None and not isinstance(values[key], list):
            raise CurriculumError(f"{where}: node {name!r}: {key} must be a list")
    merge = values.pop("merge", None)
    if merge is not None:
        if isinstance(merge, str):
            merge = {"method": merge}
        if not isinstance(merge, dict) or set(merge) - {f.name for f in fields(MergeSpec)}:
            raise CurriculumError(f"{where}: node {name!r}: merge must be a mapping with method, weights, density, "
                                  "majority_sign_method")
        merge = MergeSpec(**merge)
    try:
        return TrainingNode(**{k: v for k, v in values.items() if k in _NODE_KEYS}, merge=merge)
    except TypeError as err:
        raise CurriculumError(f"{where}: node {name!r}: {err}") from None


def _check_model_names(model: dict, path: str) -> None:
    """A model key that names a scheme must name one that exists: one line naming the file and the key."""
    from ..model.configuration_gwm import BACKBONES, RESIDUAL_BASELINES, WINDOW_SCALINGS

    for key, valid in (("window_scaling", WINDOW_SCALINGS), ("residual_baseline", RESIDUAL_BASELINES),
                       ("backbone", BACKBONES)):
        if key in model and model[key] not in valid:
            raise CurriculumError(f"{path}: model.{key} must be one of {list(valid)}, got {model[key]!r}")


def load_curriculum(path: str | os.PathLike, overrides: dict | None = None) -> Curriculum:
    """Parse and validate a curriculum YAML file; raises `CurriculumError` naming the file and the node."""
    path = str(path)
    if not os.path.exists(path) or os.path.isdir(path):
        raise CurriculumError(f"{path}: curriculum file not found" + (" (it is a folder)" * os.path.isdir(path)))
    try:
        raw = read_yaml(path, check_node=lambda root: check_duplicate_fields(root, path))
    except yaml.YAMLError as err:
        raise CurriculumError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (DataError, OSError) as err:
        raise CurriculumError(str(err) if isinstance(err, DataError) else f"{path}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise CurriculumError(f"{path}: expected a mapping with 'sources' and 'nodes' at the top level")
    unknown = sorted(set(raw) - {"defaults", "model", "sources", "nodes", "description"})
    if unknown:
        raise CurriculumError(f"{path}: unknown top-level key(s) {unknown}; valid: defaults, model, sources, nodes")
    base_dir = os.path.dirname(os.path.abspath(path))
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - _DEFAULT_KEYS:
        bad = sorted(set(defaults) - _DEFAULT_KEYS) if isinstance(defaults, dict) else defaults
        raise CurriculumError(f"{path}: bad 'defaults' {bad}; valid keys: {sorted(_DEFAULT_KEYS)}")
    model = dict(raw.get("model") or {})
    from ..model.configuration_gwm import (  # here: transformers is slow to import
        CURRICULUM_MODEL_KEYS,
        check_quantile_levels,
    )

    if set(model) - CURRICULUM_MODEL_KEYS:
        raise CurriculumError(f"{path}: unknown model key(s) {sorted(set(model) - CURRICULUM_MODEL_KEYS)}; "
                              f"valid: {sorted(CURRICULUM_MODEL_KEYS)}")
    if "quantile_levels" in model:
        try:
            model["quantile_levels"] = check_quantile_levels(model["quantile_levels"], f"{path}: model.quantile_levels")
        except ValueError as err:
            raise CurriculumError(str(err)) from None
    _check_model_names(model, path)
    base = model.get("base")
    if isinstance(base, str) and not os.path.isabs(base) and os.path.exists(os.path.join(base_dir, base)):
        model["base"] = os.path.normpath(os.path.join(base_dir, base))  # a local base next to the curriculum
    raw_sources = raw.get("sources") or {}
    if not isinstance(raw_sources, dict):
        raise CurriculumError(f"{path}: 'sources' must map source names to their declarations")
    try:
        sources = {name: DataSource.from_dict(name, spec, base_dir) for name, spec in raw_sources.items()}
    except DataError as err:
        raise CurriculumError(f"{path}: {err}") from None
    raw_nodes = raw.get("nodes")
    if raw_nodes is not None and not isinstance(raw_nodes, list):
        raise CurriculumError(f"{path}: 'nodes' must be a list")
    nodes = [_node_from_dict(n, defaults, path, i) for i, n in enumerate(raw_nodes or [])]
    if overrides:
        nodes = [replace(n, **overrides) for n in nodes]
    return Curriculum(nodes=nodes, sources=sources, model=model, path=path)
