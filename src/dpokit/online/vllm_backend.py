"""Generation with vLLM (`backend: vllm`), for a run on a CUDA GPU with the vllm package installed.

One `vllm.LLM` engine per stage, loaded from the round's policy (a model directory; LoRA adapters merged
first), and dropped when the stage ends so that training gets the GPU back. Prompts go in as the token ids
training uses (`prompt_ids`); each prompt gets one SamplingParams with n=k and its own seed drawn from the
stage's seed, so the k answers of a prompt are k samples and the stage is repeatable.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from dpokit.data.rows import Text
from dpokit.errors import DpokitError
from dpokit.online.generation import Answer, Sampling, prompt_ids


def check_vllm() -> None:
    """A one-line error unless vLLM can run here: the package importable and a CUDA GPU visible."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise DpokitError(
            "backend vllm: the vllm package is not installed (pip install vllm on a CUDA machine); "
            "use backend: transformers or openai"
        ) from None
    if not torch.cuda.is_available():
        raise DpokitError("backend vllm: needs a CUDA GPU and none is visible; use backend: transformers")


@dataclass
class VLLMBackend:
    engine: Any  # vllm.LLM
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: Sequence[Text], k: int, sampling: Sampling, seed: int) -> list[list[Answer]]:
        from vllm import SamplingParams

        seeds = random.Random(seed)
        if sampling.temperature is None:  # greedy
            drawing: dict[str, Any] = {"temperature": 0.0}
        else:
            drawing = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        params = [
            SamplingParams(n=k, max_tokens=sampling.max_new_tokens, seed=seeds.randrange(2**31), **drawing)
            for _ in prompts
        ]
        inputs = [{"prompt_token_ids": prompt_ids(prompt, self.tokenizer)} for prompt in prompts]
        outputs = self.engine.generate(
            inputs, params, use_tqdm=False
        )  # one RequestOutput per prompt, in order
        # token_ids of a completion end with the end-of-sequence token when it stopped there, as num_tokens does.
        return [[Answer(c.text, len(c.token_ids)) for c in output.outputs] for output in outputs]


@contextmanager
def open_vllm(policy: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> Iterator[VLLMBackend]:
    """A vLLM engine serving `policy` for one stage; freed on leaving."""
    check_vllm()
    from vllm import LLM

    backend = VLLMBackend(LLM(model=policy, dtype=dtype), tokenizer)
    try:
        yield backend
    finally:
        backend.engine = None
        gc.collect()
        torch.cuda.empty_cache()
