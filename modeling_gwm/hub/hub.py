"""Hub transfer of GWM adapters: upload plans, pushes (`push_adapter`, `push_curriculum`), loading by Hub id, and one
clear error when the Hub cannot be reached.

How a curriculum is published: one model repo per run, one subfolder per DAG node (and `final/` when the run has
one), with the run's `dag.json`, an index card and the curriculum's loss plot at the repo root:

    user/repo
    ├── README.md  dag.json  loss_curves.png        the run: index of nodes + the whole DAG as a mermaid graph
    ├── macro/     adapter_config.json  adapter_model.safetensors  README.md  loss_curve.png  metrics.json
    ├── markets/   ...
    └── world/     ...

One repo keeps the nodes of a run together (one commit, one history, one place to browse the lineage); subfolders
rather than branches because `from_pretrained(..., subfolder=...)` is how PEFT and transformers already address a
model inside a repo, and a branch per node would hide the DAG. Load one node with

    GWMModel.from_pretrained("THUDM/CogVideoX-2b", "user/repo", subfolder="world")

Only adapter files, cards, plots and metrics go up, chosen by an allow-list (`run_folder.NODE_FILES` in each node, the
run's CARD_FILE, DAG_FILE and LOSS_CURVES_FILE at the root): never checkpoints, never frozen weights. Cards are
re-rendered (`cards.py`) so their usage snippet names the repo. A token is only ever handed to `huggingface_hub.HfApi`;
it is never logged or written, and a push refuses to upload a file that contains it.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from ..model.base import hub_offline
from ..plots import plot_loss_curves
from ..run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    CARD_FILE,
    DAG_FILE,
    LOSS_CURVES_FILE,
    NODE_FILES,
    RunFolder,
)
from .cards import render_curriculum_card, render_node_card

logger = logging.getLogger(__name__)


class HubOfflineError(ConnectionError):
    """The Hub cannot be reached (HF_HUB_OFFLINE=1 or no network); nothing local was changed."""


# ---------------------------------------------------------------------------------------------------- upload plans
def plan_node_upload(output_dir: str | os.PathLike, node: str, folder: str | os.PathLike | None = None,
                     path_in_repo: str | None = None, repo_id: str | None = None,
                     revision: str | None = None) -> list[CommitOperationAdd]:
    """The files of one node that go up: the allow-listed ones, with the card re-rendered for `repo_id`."""
    folder = Path(folder) if folder is not None else RunFolder(output_dir).node_dir(node)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    operations = []
    for name in NODE_FILES:
        if name == CARD_FILE and (folder / ADAPTER_CONFIG_FILE).is_file():
            card = render_node_card(output_dir, node, repo_id=repo_id, subfolder=path_in_repo, revision=revision)
            operations.append(CommitOperationAdd(f"{prefix}{CARD_FILE}", str(card).encode("utf-8")))
        elif (folder / name).is_file():
            operations.append(CommitOperationAdd(f"{prefix}{name}", str(folder / name)))
    return operations


def plan_curriculum_upload(output_dir: str | os.PathLike, repo_id: str | None = None,
                           revision: str | None = None) -> list[CommitOperationAdd]:
    """Every file a curriculum push uploads, as `huggingface_hub.CommitOperationAdd`s (nothing is written).

    Repo root: README.md (index card), dag.json, loss_curves.png. One subfolder per node with saved adapter files
    (and `final/`): the files in `NODE_FILES`, cards re-rendered so their usage snippet names `repo_id`.
    """
    run = RunFolder(output_dir)
    dag = run.read_dag()
    if not dag:
        raise FileNotFoundError(f"No {DAG_FILE} in {Path(output_dir)}: not the output folder of a GWM curriculum run.")
    nodes = run.published_nodes(dag)
    for name in RunFolder.node_names(dag):
        if name not in nodes:
            logger.info("Node %r has no saved adapter in %s: not uploaded.", name, run.node_dir(name))
    if not nodes:
        raise FileNotFoundError(f"No node of the run in {Path(output_dir)} has saved adapter files: nothing to push.")
    operations = [
        CommitOperationAdd(CARD_FILE, str(render_curriculum_card(run.path, repo_id, revision)).encode("utf-8")),
        CommitOperationAdd(DAG_FILE, str(run.dag_path)),
    ]
    plot = io.BytesIO()
    plot_loss_curves(run.path, plot)
    operations.append(CommitOperationAdd(LOSS_CURVES_FILE, plot.getvalue()))
    for name in nodes:
        operations += plan_node_upload(run.path, name, path_in_repo=name, repo_id=repo_id, revision=revision)
    return operations


# ---------------------------------------------------------------------------------------------------- loading
def download_adapter(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                     token: str | bool | None = None) -> str:
    """The local folder of a GWM adapter on the Hub, through huggingface_hub's download and cache.

    Fetches `adapter_config.json` and `adapter_model.safetensors` (from `subfolder`, a curriculum node) into the
    Hugging Face cache, or finds them there when offline, and returns the folder holding them, ready for
    `GWMModel.from_pretrained(base, folder)`. Raises one clear error when offline and not cached, or when the repo,
    revision or node does not exist.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id + (f" (subfolder {subfolder})" if subfolder else "")
    where += f" at revision {revision}" if revision else ""
    paths = []
    for name in ADAPTER_FILES:
        try:
            paths.append(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, token=token))
        except LocalEntryNotFoundError:
            reason = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
            raise HubOfflineError(
                f"The adapter {where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}: "
                "load it once with network access, or pass a local adapter folder."
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"The Hub repo {repo_id} has no revision {revision!r}.") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"No Hub model repo {repo_id} (or it is private and no token was given).") from None
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"{where} has no {name}: not a GWM adapter. A curriculum repo keeps one node per subfolder: pass "
                "subfolder=<node> (its README lists the nodes)."
            ) from None
    return os.path.dirname(paths[0])


# ---------------------------------------------------------------------------------------------------- pushing
def _operation_bytes(operation: CommitOperationAdd) -> bytes:
    source = operation.path_or_fileobj
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return b""


def _offline_message(reason: str, local_dir: str | os.PathLike | None, repo_id: str) -> str:
    if local_dir is None:
        return (f"Cannot push to the Hugging Face Hub: offline ({reason}); nothing was changed. Save the adapter with "
                f"`save_pretrained` and push it later with `push_adapter(folder, {repo_id!r})`.")
    return (f"Cannot push to the Hugging Face Hub: offline ({reason}); the local files in {local_dir} are "
            f"untouched; push later with `gwm push {local_dir} --hub_model_id {repo_id}`.")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the Hub cannot be reached', whichever HTTP client this huggingface_hub uses."""
    import importlib

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.append(getattr(module, "TransportError", None) or module.ConnectionError)
    return tuple(errors)


def _commit(operations: list[CommitOperationAdd], repo_id: str, *, local_dir: str | os.PathLike | None,
            token: str | None, private: bool | None, revision: str | None, commit_message: str) -> str:
    """create_repo + (create_branch) + create_commit, with one clear message when the Hub cannot be reached."""
    if isinstance(token, str) and token:
        for operation in operations:
            if token.encode("utf-8") in _operation_bytes(operation):
                raise ValueError(f"Refusing to upload {operation.path_in_repo}: it contains the Hub token.")
    if hub_offline():
        raise HubOfflineError(_offline_message("HF_HUB_OFFLINE is set", local_dir, repo_id))
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except _network_errors() as err:
        raise HubOfflineError(_offline_message(f"no network: {type(err).__name__}", local_dir, repo_id)) from None
    logger.info("Pushed %d files to %s: %s", len(operations), repo_id, info.commit_url)
    return info.commit_url


def push_curriculum(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None,
                    revision: str | None = None) -> str:
    """Publish a whole run to one Hub repo, one subfolder per node (see the module docstring). Returns the commit URL.

    Load a node back with `GWMModel.from_pretrained(base, repo_id, subfolder=node)`.
    """
    operations = plan_curriculum_upload(output_dir, repo_id=repo_id, revision=revision)
    nodes = sorted({op.path_in_repo.split("/")[0] for op in operations if "/" in op.path_in_repo})
    return _commit(operations, repo_id, local_dir=output_dir, token=token, private=private, revision=revision,
                   commit_message=f"Upload GWM curriculum ({len(nodes)} nodes: {', '.join(nodes)})")


def push_adapter(model_or_folder, repo_id: str, *, adapter_name: str | None = None, subfolder: str | None = None,
                 private: bool | None = None, token: str | None = None, revision: str | None = None) -> str:
    """Push one adapter with its GWM card: a `PeftModel` (its `adapter_name`, default the active one) or a node folder.

    Use this rather than `PeftModel.push_to_hub`, which replaces the card with a generic transformers one. A node
    folder inside a run keeps its lineage and metrics; a bare model gets a card from its adapter config alone.
    `subfolder` puts the files under that folder of the repo. Returns the commit URL.
    """
    with tempfile.TemporaryDirectory() as staging:
        if isinstance(model_or_folder, (str, os.PathLike)):
            source, local_dir = Path(model_or_folder), str(model_or_folder)
            if not all((source / f).is_file() for f in ADAPTER_FILES):
                raise FileNotFoundError(f"{source} is not an adapter folder (needs {' + '.join(ADAPTER_FILES)}).")
            node = source.name
        else:
            name, local_dir = adapter_name or model_or_folder.active_adapter, None
            model_or_folder.save_pretrained(Path(staging, "saved"), selected_adapters=[name],
                                            save_embedding_layers=False)
            source = Path(staging, "saved", name if name != "default" else "")  # PEFT's layout for named adapters
            node = name if name != "default" else repo_id.split("/")[-1]
        if local_dir is not None and RunFolder(source.parent).exists():
            run_dir = source.parent  # a node of a run: its card keeps lineage and metrics
        else:
            run_dir = Path(staging, "run")
            (run_dir / node).mkdir(parents=True)
            for name in NODE_FILES:
                if name != CARD_FILE and (source / name).is_file():
                    shutil.copy2(source / name, run_dir / node / name)
        operations = plan_node_upload(run_dir, node, path_in_repo=subfolder, repo_id=repo_id, revision=revision)
        return _commit(operations, repo_id, local_dir=local_dir, token=token, private=private, revision=revision,
                       commit_message=f"Upload GWM adapter {node}")


__all__ = [
    "HubOfflineError",
    "download_adapter",
    "plan_curriculum_upload",
    "plan_node_upload",
    "push_adapter",
    "push_curriculum",
]
