"""Scale-out: the engine a run trains with (one process, DDP, FSDP2 or DeepSpeed ZeRO-3), the presets shipped
for it, and the few cross-process steps dpokit takes itself.

torchrun --nproc-per-node 8 -m dpokit.cli train my.yaml --distributed fsdp2
accelerate launch --config_file "$(dpokit preset fsdp2)" -m dpokit.cli train my.yaml
torchrun --nproc-per-node 8 -m dpokit.cli train my.yaml --distributed deepspeed-zero3   # pip install 'dpokit[deepspeed]'

Processes are started by torchrun or `accelerate launch`; accelerate sets up the process group (NCCL on GPUs,
gloo on CPU) and DDP. FSDP2 is PyTorch's `fully_shard`, applied here rather than by accelerate because
accelerate 1.15 enables its FSDP path only on GPU backends (state.py), and dpokit's FSDP2 path must run, and
be tested, on CPU with gloo as well. ZeRO-3 is `deepspeed.initialize`, called here for the same reason, on
the process group accelerate made.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from dpokit.errors import DpokitError

PRESETS = ("single", "ddp", "fsdp2", "fsdp2-offload", "deepspeed-zero3")
PRESET_DIR = Path(__file__).parent / "resources" / "accelerate"


@dataclass(frozen=True)
class Engine:
    """How the processes of a run share the work.

    name: "single" (one process), "ddp" (a full replica per process, gradients all-reduced), "fsdp2"
    (weights, gradients and AdamW state sharded over processes by PyTorch) or "zero3" (the same sharding by
    DeepSpeed ZeRO stage 3).
    offload: FSDP2 keeps the sharded weights, gradients and AdamW state in CPU memory.
    reshard_after_forward: FSDP2 frees each layer's gathered weights after its forward (gathered again for
    the backward): less memory, one more all-gather per layer.
    """

    name: str = "single"
    offload: bool = False
    reshard_after_forward: bool = True

    @property
    def sharded(self) -> bool:
        """Each process holds a shard of every weight: forward passes run on all processes together."""
        return self.name in ("fsdp2", "zero3")


def world_size() -> int:
    """Processes in this run, as the launcher (torchrun, accelerate launch) announced them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def first_process() -> bool:
    """Whether this is the first process of a launched run, or the only process: it alone shows warnings and
    progress bars, which every process would otherwise print once each (8 copies on 8 GPUs). Read from the
    launcher's RANK before the process group exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar, shown by the first process only."""
    return tqdm(iterable, disable=not first_process(), **kwargs)


def from_main(accelerator: Accelerator, value: Any) -> Any:
    """`value` as the main process has it, on every process (a broadcast; as it is with one process). For
    what the main process alone computes under DDP (the greedy samples) and every process must act on
    alike: a stop decided on it must come in all of them, or the others would wait for the one that left."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def preset_path(name: str) -> Path:
    """The accelerate config file of a shipped preset."""
    if name not in PRESETS:
        raise DpokitError(f"--distributed: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESET_DIR / f"{name}.yaml"


def engine_from_accelerate_config(config: dict[str, Any], source: str) -> Engine:
    """The engine an accelerate config file (a shipped preset or the user's own) describes."""
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        return zero3_engine(config.get("deepspeed_config") or {}, source)
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            raise DpokitError(f"{source}: fsdp_config.fsdp_version must be 2 (dpokit runs FSDP2 only)")
        return Engine(
            "fsdp2",
            offload=bool(fsdp.get("fsdp_offload_params", False)),
            reshard_after_forward=bool(fsdp.get("fsdp_reshard_after_forward", True)),
        )
    return Engine("single" if kind == "NO" else "ddp")


def named_engine(distributed: str) -> Engine:
    """The engine `--distributed` names: a preset name or an accelerate config file."""
    path = Path(distributed) if distributed.endswith((".yaml", ".yml")) else preset_path(distributed)
    if not path.is_file():
        raise DpokitError(f"--distributed: {path} does not exist")
    return engine_from_accelerate_config(yaml.safe_load(path.read_text()) or {}, str(path))


def resolve_engine(distributed: str | None) -> Engine:
    """The engine of this run: `--distributed` (a preset name or an accelerate config file) when given, else
    what `accelerate launch --config_file ...` put in the environment, else DDP across several processes."""
    if distributed is not None:
        engine = named_engine(distributed)
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        deepspeed = {
            "zero_stage": os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"),
            "offload_optimizer_device": os.environ.get(
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"
            ),
            "offload_param_device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
            "deepspeed_config_file": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
        }
        engine = engine_from_accelerate_config(
            {"distributed_type": "DEEPSPEED", "deepspeed_config": deepspeed}, "accelerate launch"
        )
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp = {
            "fsdp_version": os.environ.get("FSDP_VERSION", "1"),
            "fsdp_offload_params": os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
            "fsdp_reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
            not in ("false", "no_shard", "shard_grad_op"),
        }
        engine = engine_from_accelerate_config(
            {"distributed_type": "FSDP", "fsdp_config": fsdp}, "accelerate launch"
        )
    else:
        engine = Engine("ddp" if world_size() > 1 else "single")
    if engine.sharded and "LOCAL_RANK" not in os.environ:
        flag = distributed or {"fsdp2": "fsdp2", "zero3": "deepspeed-zero3"}[engine.name]
        command = next((word for word in sys.argv[1:2] if word in ("train", "iterate")), "train")
        raise DpokitError(
            f"--distributed: {flag} needs a launcher, even for one process: dpokit {command} ... "
            f"--distributed {flag} --num-processes N, or torchrun --nproc-per-node N -m dpokit.cli {command} ..."
        )
    if engine.name == "single" and world_size() > 1:
        raise DpokitError(
            f"--distributed: 'single' runs one process, but the launcher started {world_size()}; "
            "use ddp or fsdp2"
        )
    return engine


def zero3_engine(deepspeed: dict[str, Any], source: str) -> Engine:
    """The engine an accelerate `deepspeed_config` block describes: ZeRO stage 3 without offload, the one
    DeepSpeed configuration dpokit runs and tests."""
    if deepspeed.get("deepspeed_config_file"):
        raise DpokitError(
            f"{source}: deepspeed_config.deepspeed_config_file is not read by dpokit; use the zero_stage form"
        )
    if str(deepspeed.get("zero_stage", 2)) != "3":
        raise DpokitError(
            f"{source}: deepspeed_config.zero_stage must be 3 (dpokit runs DeepSpeed ZeRO-3 only)"
        )
    offloaded = [
        key
        for key in ("offload_optimizer_device", "offload_param_device")
        if str(deepspeed.get(key, "none")).lower() != "none"
    ]
    if offloaded:
        raise DpokitError(
            f"{source}: deepspeed_config.{offloaded[0]} must be none (dpokit does not run ZeRO offload; "
            "fsdp2-offload keeps shards in CPU memory)"
        )
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        raise DpokitError(
            f"{source}: DeepSpeed ZeRO-3 needs the deepspeed package: pip install 'dpokit[deepspeed]'"
        ) from None
    return Engine("zero3")


def make_accelerator(**kwargs: Any) -> Accelerator:
    """accelerate's Accelerator for this process. Launched processes on a machine without CUDA need cpu=True:
    without it accelerate 1.15 leaves each process alone (no process group), each training on its own."""
    launched = "LOCAL_RANK" in os.environ
    return Accelerator(cpu=launched and not torch.cuda.is_available(), **kwargs)


def shard_model(model: torch.nn.Module, engine: Engine, compute_dtype: torch.dtype | None) -> None:
    """Apply FSDP2 in place: one `fully_shard` unit per decoder layer (the classes transformers marks as
    `_no_split_modules`), one for the LM head, then the root (embeddings, final norm): the transformers
    model itself, under any PEFT wrapper.

    compute_dtype: under a mixed precision, FSDP2 gathers weights in this dtype for the forward and backward,
    while the sharded master weights, AdamW state and the gradient reduction stay float32 (SPEC §9); None
    computes in the weights' own dtype.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"reshard_after_forward": engine.reshard_after_forward}
    if compute_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if engine.offload:
        options["offload_policy"] = CPUOffloadPolicy()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = set(getattr(base, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, **options)
    # dpokit's log-prob code calls the LM head itself, chunk by chunk, outside the model's forward: as a unit
    # of its own, each call gathers its weight (kept gathered until the backward is done).
    head = base.get_output_embeddings()
    if head is not None and head.weight is not base.get_input_embeddings().weight:
        fully_shard(head, **(options | {"reshard_after_forward": False}))
    # The root is the transformers model, inside a PEFT wrapper if any: peft's generate() calls that model,
    # never the wrapper, and a root that never runs its forward never gathers the embeddings. The root keeps
    # FSDP2's default (gathered until the backward): True there crashed the backward on gloo.
    fully_shard(base, **(options | {"reshard_after_forward": None}))


def fill_from_rank0(
    model: torch.nn.Module, full_state: dict[str, torch.Tensor], device: torch.device, offload: bool
) -> None:
    """Give a model just sharded by `shard_model` rank 0's weights and buffers, so that only rank 0 ever
    read the model from disk (the other processes built it on the meta device, holding no memory).

    full_state: rank 0's `state_dict()` taken before sharding, whole and on its CPU; {} on other ranks.
    Each tensor is broadcast in turn and each process keeps its own shard of it: the other processes hold
    one whole tensor at a time beside their shards, never a whole model. Tied weights (SmolLM2's LM head is
    its input embedding) stay one parameter: `to_empty` and the load keep each parameter object.
    offload: FSDP2's CPU offload keeps the shards in CPU memory, so the other ranks allocate them there.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device="cpu" if offload else device)  # uninitialised memory, overwritten below
    set_model_state_dict(
        model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    # Buffers left out of the state dict (Llama's rotary `inv_freq`) are computed when a model is built,
    # which the meta device skipped: after `to_empty` they hold garbage until rank 0's arrive.
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            received = buffer.to(device)
            dist.broadcast(received, src=0)
            setattr(module, name, received)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def clip_grad_norm(accelerator: Accelerator, model: torch.nn.Module, params: list, max_norm: float) -> float:
    """Clip the gradients of `params` to a global norm of `max_norm`; returns the norm before clipping.

    Under FSDP2 each process holds a shard of every gradient: torch's clip computes the norm as a DTensor
    reduced over all shards, read here as one number."""
    if not is_sharded(model):
        return float(accelerator.clip_grad_norm_(params, max_norm))
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered from every process's shards onto rank 0's CPU (other ranks get an
    empty dict or None). A collective: every process must call it."""
    if hasattr(model, "_zero3_consolidated_16bit_state_dict"):  # a DeepSpeed engine
        # Despite its name it keeps the weights' own dtype; it gathers one layer at a time onto rank 0, as
        # accelerate's and transformers' own ZeRO-3 saves do.
        return model._zero3_consolidated_16bit_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def zero3_initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Partition `model` and `optimizer`'s state over the processes with DeepSpeed ZeRO-3; returns DeepSpeed's
    engine (the model to call) and its ZeRO optimizer. `optimizer` (torch's AdamW) still does the update, on
    each process's float32 partition, so the scheduler built on it keeps setting its learning rate.

    dpokit owns the step: `managed_gradient_accumulation: false` lets each optimizer step take as many
    micro-batches as it has (one `backward` each, gradients reduce-scattered into the partitions as they
    come), and `zero3_step` ends it. The batch sizes DeepSpeed requires are placeholders it never uses then.
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        # Every weight partitioned (DeepSpeed's default keeps those under 1e5 elements whole on every
        # process), as FSDP2 shards every weight: tiny test models then take the same gather path as large ones.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the update every other engine runs
        "steps_per_print": 2**62,  # dpokit logs its own metrics
    }
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_optimizer


def zero3_step(engine: torch.nn.Module) -> float:
    """End a ZeRO-3 optimizer step: clip to `gradient_clipping`, step AdamW on each partition, zero the
    gradients; returns the global gradient norm before clipping. DeepSpeed skips the update itself when that
    norm is NaN or infinite (and returns it), so the weights are untouched by a non-finite step."""
    engine.step()
    return float(engine.get_global_grad_norm())
