"""Load the policy, the tokenizer and (when asked) a separate reference model.

The reference is never a second copy of the weights when LoRA is used: `reference_context` disables the
adapters for the duration of a reference forward pass, which gives exactly the base model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpokit.errors import DpokitError


def resolve_model_source(name: str) -> tuple[str, dict]:
    """Map a model name to (from_pretrained path, extra kwargs): 'smollm2', a .gguf file, a directory, a Hub id."""
    if name == "smollm2":
        from dpokit.models.smollm2 import smollm2_dir

        return str(smollm2_dir()), {}
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.exists():
            raise DpokitError(f"{path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise DpokitError(f"{path}: a model must be a directory, a .gguf file or a Hub name")
    if name.startswith((".", "/")) and not path.exists():
        raise DpokitError(f"{path}: no such model directory")
    return name, {}


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter directory, or None when `path` is not an adapter."""
    config = Path(path) / "adapter_config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    has_own = (Path(name) / "tokenizer_config.json").exists()
    source, extra = resolve_model_source(name if has_own else adapter_base(name) or name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as error:
        raise DpokitError(f"{name}: cannot load a tokenizer ({str(error).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    on_meta: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with dropout disabled (DPO compares policy and reference log-probs: no noise).

    dtype: storage of the weights (`Precision.trainable_dtype` or `frozen_dtype`); with `load_in_4bit`, the
    dtype the 4-bit layers compute in.
    on_meta: build the same architecture from the model's config on the meta device, reading no weights:
    FSDP2's other processes build this, shard it and take rank 0's weights (`distributed.fill_from_rank0`).
    """
    source, extra = resolve_model_source(name)
    if on_meta:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        except OSError as error:
            raise DpokitError(f"{name}: cannot load a model config ({str(error).splitlines()[0]})") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return without_dropout(model)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as error:
        raise DpokitError(f"{name}: cannot load a model ({str(error).splitlines()[0]})") from None
    return without_dropout(model)


def without_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Set every dropout probability of `model` to 0, in place; returns `model`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str],
    quantized: bool,
) -> PreTrainedModel:
    """Wrap `model` with fresh LoRA adapters (peft); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Checkpointing, when asked, is already on (enable_checkpointing); peft must not redo it without our
        # recompute context. It still freezes and upcasts the base as QLoRA needs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place: regional compilation, one layer's graph compiled once and
    reused by every layer (their weights are inputs to it), where compiling the whole model would trace the
    loss code and our hooks too. Call after LoRA is added: changing a compiled layer recompiles it."""
    base = model.get_base_model() if is_peft(model) else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise DpokitError(f"compile: {type(base).__name__} has no list of decoder layers to compile")
    for layer in layers:
        layer.compile()


def load_adapter(path: str, base: PreTrainedModel, trainable: bool = False) -> PreTrainedModel:
    """Attach a saved PEFT adapter to `base`: frozen (evaluation, export) or trainable (training goes on
    from it). A base on the meta device (FSDP2's other ranks, `load_model(on_meta=True)`) gets its adapter
    there too, its weights to come from rank 0: peft's low_cpu_mem_usage builds it there, where copying the
    saved weights into meta tensors would be a no-op that torch warns about once per weight."""
    from peft import PeftModel

    on_meta = base.device.type == "meta"
    return PeftModel.from_pretrained(base, path, is_trainable=trainable, low_cpu_mem_usage=on_meta)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_context(
    policy: torch.nn.Module, reference: torch.nn.Module | None
) -> Iterator[torch.nn.Module]:
    """Yield the module that computes reference log-probs, under no_grad.

    With a separate reference it is that model; otherwise the policy with its LoRA adapters disabled.
    """
    with torch.no_grad():
        if reference is not None:
            yield reference
        elif is_peft(policy):
            with policy.disable_adapter():
                yield policy
        else:
            raise DpokitError(
                "reference: full fine-tuning needs a separate reference model or precomputed log-probs"
            )
