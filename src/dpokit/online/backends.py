"""The generation backend of a stage, as the config's `backend` names it, serving one round's policy.

    with open_backend(loop, n, log) as backend:      # the policy after round n
        answers = backend.generate(prompts, k, sampling, seed)

transformers generates with the policy loaded in this process (or the model passed in). vllm and openai
load the policy elsewhere, so they get it as a model on disk (`served_model`): a LoRA adapter is merged into
round-N/merged once, since neither engine is given the base and adapter separately. openai with a
server_command starts the server for the stage (its output in `log`) and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from dpokit.models.loading import adapter_base, load_adapter, load_model, resolve_model_source
from dpokit.online.config import IterateConfig, fill
from dpokit.online.generation import GenerationBackend, TransformersBackend
from dpokit.online.models import inference_device, load_frozen
from dpokit.online.openai_backend import OpenAIBackend
from dpokit.online.openai_http import OpenAIClient, read_api_key
from dpokit.online.server import serve
from dpokit.online.vllm_backend import check_vllm, open_vllm
from dpokit.train.output import save_final
from dpokit.train.precision import resolve_precision

if TYPE_CHECKING:
    from dpokit.online.loop import Loop


def check_backend(config: IterateConfig) -> None:
    """Fail before round 1 when the backend cannot run: vllm without its package or a GPU, a missing key."""
    if config.backend == "vllm":
        check_vllm()
    elif config.backend == "openai":
        read_api_key(config.openai.api_key_env, "openai")


def served_model(loop: Loop, n: int) -> str:
    """The policy after round n as an engine loads it: a model directory (a LoRA adapter merged into
    round-n/merged first, once), or for round 0 the starting model's directory, GGUF file or Hub name."""
    name = loop.policy(n)
    base = adapter_base(name)
    if base is None:
        return name if name.endswith(".gguf") else resolve_model_source(name)[0]
    merged = loop.round_dir(n) / "merged"
    if not merged.exists():
        train = loop.config.train
        model = load_adapter(name, load_model(base, trust_remote_code=train.trust_remote_code))
        save_final(model.merge_and_unload(), loop.tokenizer, merged)
    return str(merged)


@contextmanager
def open_backend(
    loop: Loop, n: int, log: Path, model: PreTrainedModel | None = None
) -> Iterator[GenerationBackend]:
    """The configured backend generating with the policy after round n; `model`: that policy, already loaded
    (used by transformers only); `log`: where a started server's output goes."""
    config = loop.config
    if config.backend == "transformers":
        policy = model if model is not None else load_frozen(loop.policy(n), config.train)
        yield TransformersBackend(policy, loop.tokenizer, config.generation_batch_size)
    elif config.backend == "vllm":
        dtype = resolve_precision(config.train.precision, inference_device()).frozen_dtype
        with open_vllm(served_model(loop, n), loop.tokenizer, dtype) as backend:
            yield backend
    else:
        with _server_backend(loop, n, log) as backend:
            yield backend


@contextmanager
def _server_backend(loop: Loop, n: int, log: Path) -> Iterator[GenerationBackend]:
    server = loop.config.openai
    if server.server_command is None:  # the user's server, as it is
        client = OpenAIClient.from_config(server.url, server, "openai")
        yield OpenAIBackend(client, server.model, loop.tokenizer, server)
        return
    policy = served_model(loop, n)
    # Engines take minutes to load: say what is being waited for, and where its output goes.
    loop.console.print(
        f"starting the server on {policy} (up to {server.startup_timeout_s:g}s; its output: {log})"
    )
    with serve(server.server_command, policy, server.url, log, server.startup_timeout_s) as url:
        client = OpenAIClient.from_config(url, server, "openai")
        yield OpenAIBackend(client, fill(server.model, {"policy": policy}), loop.tokenizer, server)
