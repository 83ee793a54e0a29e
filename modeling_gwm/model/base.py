"""The frozen base: CogVideoX transformer blocks loaded from a diffusers checkpoint, or scratch blocks.

Only the transformer blocks and one time embedding survive loading. Everything else of the video model (patch
embedding, output head) is dropped, so the base costs exactly its blocks' memory. `build_frozen_base` picks the
base a `GWMConfig` names.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .configuration_gwm import GWMConfig

logger = logging.getLogger(__name__)

# Architecture settings of the published CogVideoX transformers (from their `transformer/config.json`).
COGVIDEOX_ARCHITECTURES: dict[str, dict] = {
    "THUDM/CogVideoX-2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, time_embed_dim=512,
                               text_embed_dim=4096, use_rotary_positional_embeddings=False),
    "THUDM/CogVideoX-5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512,
                               text_embed_dim=4096, use_rotary_positional_embeddings=True),
}

# The tiny CogVideoX-architecture checkpoint used by tests, CI and the demo (random weights, shipped in the repo).
TINY_ARCHITECTURE = dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, time_embed_dim=32,
                         text_embed_dim=32, in_channels=4, out_channels=4, sample_width=8, sample_height=8,
                         sample_frames=5, max_text_seq_length=8)
# It lives in the source repository, next to the package: an installed wheel does not carry it (see `tiny_base_hint`).
TINY_BASE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configuration", "tiny-cogvideox")


def tiny_base_hint() -> str:
    """Where the tiny base is, or (installed from a wheel, without the repository) how to get it, in one sentence."""
    if os.path.isdir(TINY_BASE_PATH):
        return TINY_BASE_PATH
    return ("configuration/tiny-cogvideox of the GWM source repository, or the same seeded checkpoint written by "
            "`gwm make-tiny-base DIR` (modeling_gwm.model.base.make_tiny_cogvideox), then passed as --base DIR")


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off: huggingface_hub's offline mode, or HF_HUB_OFFLINE set after the
    library was imported (it reads the variable once, at import). The base's load errors and the Hub pushes ask it."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


class BaseLoadError(OSError):
    """The frozen base could not be loaded (offline, wrong id, not a CogVideoX checkpoint)."""


@dataclass
class FrozenBase:
    """What GWM keeps of a video transformer: its blocks and the time embedding they are conditioned on."""

    blocks: nn.ModuleList  # frozen CogVideoXBlock (or ScratchBlock) modules
    temb: torch.Tensor  # (1, time_embed_dim) time embedding at the configured timestep
    inner_dim: int
    source: str  # what was loaded, for messages and cards


class DeviceError(ValueError):
    """A device that this machine does not have (e.g. `cuda` without a CUDA device), or a name torch does not know."""


def resolve_device(device: str | torch.device | None = "auto", flag: str | None = None) -> torch.device:
    """The torch device `device` names; `"auto"` (or None) is CUDA when a CUDA device is present, else the CPU.

    A CUDA device this machine lacks, or a name torch does not know, is a `DeviceError` of one sentence naming
    `flag` (a command-line flag such as `--device`) or else the `device=` argument.
    """
    label = f"{flag} {device}" if flag else f"device={str(device)!r}"
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"{label}: not a device torch knows (use cpu, cuda, cuda:N or auto)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{label}: CUDA is not available on this machine (torch {torch.__version__} finds no "
                              f"CUDA device); use {flag or 'device='}{' ' if flag else ''}cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"{label}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_frozen_dtype(name: str, device: torch.device | str | None) -> torch.dtype:
    """`"auto"` is bf16 on CUDA, fp32 elsewhere (bf16 matmuls are slow on CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return getattr(torch, name)


def _time_embedding(transformer, timestep: int) -> torch.Tensor:
    # The blocks' adaptive norms read a time embedding; compute it once with the base's own projection, in fp32
    # arithmetic whatever the frozen dtype (the projection is dropped afterwards; its weights are as loaded).
    with torch.no_grad():
        embedding = transformer.time_embedding.float()
        t = torch.tensor([timestep], dtype=torch.long, device=embedding.linear_1.weight.device)
        return embedding(transformer.time_proj(t).float())  # (1, time_embed_dim)


def _cast_inputs_to_block_dtype(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next(block.parameters()).dtype
    cast = lambda x: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _outputs_to_float32(block: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    return tuple(o.float() for o in output)  # (B, N, inner), (B, S, inner)


def cast_at_block_boundary(blocks: nn.ModuleList) -> nn.ModuleList:
    """The one place where dtypes meet: each frozen block casts its floating inputs to its own dtype (bf16, say) and
    returns fp32, whoever calls it (the bare model, a loop layer, a checkpoint recomputation). Hooks, not a wrapper
    module, so the state-dict keys (and every adapter file) stay those of the base; a trained block copy
    (`LoopConfig.train_blocks`) inherits them through `deepcopy`."""
    for block in blocks:
        if not getattr(block, "_gwm_casts_at_boundary", False):  # a base shared by two models is hooked once
            block.register_forward_pre_hook(_cast_inputs_to_block_dtype, with_kwargs=True)
            block.register_forward_hook(_outputs_to_float32, with_kwargs=True)
            block._gwm_casts_at_boundary = True
    return blocks


_compile_failure: list[str] = []  # the first torch.compile failure of this process: warned once, then eager


def _compiler_gave_up(err: BaseException) -> None:
    if not _compile_failure:
        _compile_failure.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        warnings.warn(f"compile_blocks: torch.compile does not work with this torch ({_compile_failure[0]}); the "
                      "frozen blocks run uncompiled", RuntimeWarning, stacklevel=3)


def _is_compiler_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"])


def _eager_on_compiler_failure(block: nn.Module, compiled):
    """`block`'s compiled call, or its plain one once the compiler has failed in this process (errors of the
    block itself are raised as they are: the plain call raises them again)."""
    def call(*args, **kwargs):
        if not _compile_failure:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 -- only the compiler's own errors are caught below
                if not _is_compiler_error(err):
                    raise
                _compiler_gave_up(err)
        return block._call_impl(*args, **kwargs)
    return call


def compile_frozen_blocks(blocks: nn.ModuleList) -> bool:
    """Regional compilation: each frozen block compiled with `torch.compile` (`nn.Module.compile`, in place, so the
    state-dict keys stay the base's), hooks included. The blocks are identical, so the compiler reuses one graph for
    all of them; the blocks live as long as the base, so a process compiles once however many nodes and adapters
    run on them. A torch without a working compiler (no C++ compiler, no Triton, an unsupported Python) falls back
    to the plain blocks with one warning. Returns whether the blocks are compiled."""
    if _compile_failure:
        return False
    try:
        for block in blocks:
            if getattr(block, "_gwm_compiled", False):  # a base shared by two models is compiled once
                continue
            block.compile()
            # torch compiles lazily, on the first call: a compiler that fails then falls back there
            block._compiled_call_impl = _eager_on_compiler_failure(block, block._compiled_call_impl)
            block._gwm_compiled = True
    except Exception as err:  # noqa: BLE001 -- torch.compile itself refused (e.g. no dynamo for this Python)
        for block in blocks:
            block._compiled_call_impl, block._gwm_compiled = None, False
        _compiler_gave_up(err)
        return False
    return True


def copy_block(block: nn.Module) -> nn.Module:
    """A deep copy of a block that runs its own weights: a compiled block's compiled call belongs to the original."""
    block = copy.deepcopy(block)
    for module in block.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl, module._gwm_compiled = None, False
    return block


def _refuse_pickled_only(name_or_path: str, subfolder: str) -> None:
    """A local checkpoint whose weights are only pickled (`.bin`, `.pt`, `.ckpt`) is refused before anything reads
    them: unpickling runs arbitrary code, and diffusers would otherwise fall back to it."""
    folder = os.path.join(name_or_path, subfolder)
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise BaseLoadError(f"The CogVideoX base {folder} holds only pickled weights ({', '.join(pickled)}) and GWM "
                            "loads safetensors only (never unpickles): convert it with diffusers' save_pretrained "
                            "(safe_serialization=True) or use a checkpoint that ships safetensors.")


def load_cogvideox_base(
    name_or_path: str,
    timestep: int = 0,
    *,
    subfolder: str = "transformer",
    revision: str | None = None,
    token: str | bool | None = None,
    architecture: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> FrozenBase:
    """Load the blocks of a CogVideoX transformer through diffusers' own `from_pretrained`, safetensors only, straight
    in `dtype` (a 5b base never passes through an fp32 copy).

    `architecture` (CogVideoX config keyword arguments) instead builds the blocks on the meta device from those
    settings, without any weights: for counting parameters of a model too large to download.
    """
    from diffusers import CogVideoXTransformer3DModel

    if architecture is not None:
        with torch.device("meta"):
            transformer = CogVideoXTransformer3DModel(**architecture)
        temb = torch.zeros(1, transformer.config.time_embed_dim, device="meta")
        source = f"{name_or_path} (architecture only, meta device)"
    else:
        looks_local = os.path.isabs(str(name_or_path)) or str(name_or_path).startswith(".")
        if looks_local and not os.path.isdir(name_or_path):  # a path, not a Hub id: no network round trip
            raise BaseLoadError(f"No CogVideoX base folder at {name_or_path}: pass a folder holding a diffusers "
                                f"checkpoint with a '{subfolder}/' subfolder (e.g. {tiny_base_hint()}), a Hub id, or "
                                "use backbone='scratch'.")
        _refuse_pickled_only(str(name_or_path), subfolder)
        try:
            transformer = CogVideoXTransformer3DModel.from_pretrained(
                name_or_path, subfolder=subfolder, revision=revision, token=token, torch_dtype=dtype,
                use_safetensors=True,
            )
        except (OSError, ValueError) as err:
            hint = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
            raise BaseLoadError(
                f"Could not load the CogVideoX base {name_or_path!r}{hint}: {str(err).splitlines()[0]} "
                f"-- pass a local folder holding a diffusers checkpoint with a '{subfolder}/' subfolder "
                f"(e.g. {tiny_base_hint()}), or use backbone='scratch'."
            ) from None
        temb = _time_embedding(transformer, timestep)
        source = str(name_or_path)
    inner_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    blocks = transformer.transformer_blocks.to(dtype)  # a no-op once loaded in dtype; the meta blocks get it here
    return FrozenBase(blocks=blocks, temb=temb, inner_dim=inner_dim, source=source)


class ScratchBlock(nn.Module):
    """A CogVideoX-shaped block in plain torch: joint attention over `[encoder tokens, canvas]`, then an MLP.

    Same call signature and return as `diffusers`' `CogVideoXBlock`, so the loop adapter wraps either one. The time
    embedding modulates both sub-layers through a zero-initialised adaptive scale, as CogVideoX's does.
    """

    def __init__(self, dim: int, num_attention_heads: int, time_embed_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_attention_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.time_mod = nn.Linear(time_embed_dim, 2 * dim)
        nn.init.zeros_(self.time_mod.weight)
        nn.init.zeros_(self.time_mod.bias)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        text_len = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S + N, D)
        scale_attn, scale_ff = (1 + self.time_mod(temb)).unsqueeze(1).chunk(2, dim=-1)  # (B|1, 1, D) each
        normed = self.norm1(joint)
        joint = joint + scale_attn * self.attn(normed, normed, normed, need_weights=False)[0]
        joint = joint + scale_ff * self.ff(self.norm2(joint))
        return joint[:, text_len:], joint[:, :text_len]


def build_scratch_base(num_layers: int, num_attention_heads: int, attention_head_dim: int, time_embed_dim: int,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> FrozenBase:
    """Randomly initialised blocks (seeded, so every process builds the same ones), in `dtype`."""
    inner_dim = num_attention_heads * attention_head_dim
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's generator
        torch.default_generator.manual_seed(seed)
        blocks = nn.ModuleList([ScratchBlock(inner_dim, num_attention_heads, time_embed_dim)
                                for _ in range(num_layers)])
        temb = torch.randn(1, time_embed_dim) / math.sqrt(time_embed_dim)
    return FrozenBase(blocks=blocks.to(dtype), temb=temb, inner_dim=inner_dim, source="scratch")


def build_frozen_base(config: GWMConfig, architecture: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> FrozenBase:
    """The frozen blocks a config asks for, in `dtype`; `backbone="cogvideox"` falls back to scratch without
    diffusers."""
    backbone = config.backbone
    if backbone == "cogvideox":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            logger.warning("diffusers is not installed: falling back to the scratch backbone (pip install diffusers).")
            config.backbone = backbone = "scratch"
    if backbone == "cogvideox":
        return load_cogvideox_base(config.base_model_name_or_path, config.block_timestep, architecture=architecture,
                                   dtype=dtype)
    return build_scratch_base(config.scratch_num_layers, config.scratch_num_attention_heads,
                              config.scratch_attention_head_dim, config.scratch_time_embed_dim, seed=config.seed,
                              dtype=dtype)


def make_tiny_cogvideox(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write a tiny CogVideoX-architecture checkpoint (random weights) in the diffusers layout.

    The folder gets `transformer/config.json` and `transformer/diffusion_pytorch_model.safetensors`, exactly like
    `THUDM/CogVideoX-2b`, and loads through the same `from_pretrained` path. Deterministic for a given seed.
    """
    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's generator
        torch.default_generator.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**{**TINY_ARCHITECTURE, **overrides})
        # Unit-gain random weights (std 1/sqrt(fan_in)): attention logits of order one, so the random blocks route
        # information selectively, as trained ones do; a small-std init would make every attention map uniform.
        with torch.no_grad():
            for param in transformer.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, param.shape[1] ** -0.5)
    transformer.save_pretrained(os.path.join(path, "transformer"))
    return str(path)
