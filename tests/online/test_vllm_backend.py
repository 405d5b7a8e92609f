"""The vllm backend: the Sampling -> SamplingParams mapping and the k-per-prompt regrouping, on a fake `vllm`
module (vLLM needs CUDA); one real test runs only where vllm and a GPU are."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from test_loop import iterate_config

from dpokit.errors import DpokitError
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.online import loop as online_loop
from dpokit.online.generation import Sampling, TransformersBackend, prompt_ids
from dpokit.online.vllm_backend import check_vllm, open_vllm

PROMPTS = ["The movie was", [{"role": "user", "content": "What color is the sky?"}], "Hello there,"]


@dataclass
class Completion:
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    outputs: list[Completion]


def fake_vllm() -> types.ModuleType:
    """A `vllm` module whose LLM records what it is given and answers 'p{prompt}-s{sample}' with sample+1
    tokens, so the regrouping and the lengths can be checked."""
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    class LLM:
        instances: list = []

        def __init__(self, **kwargs) -> None:
            self.kwargs, self.calls = kwargs, []
            LLM.instances.append(self)

        def generate(self, inputs, params, use_tqdm=True):
            self.calls.append((inputs, params))
            return [
                RequestOutput([Completion(f"p{i}-s{j}", [7] * (j + 1)) for j in range(p.kwargs["n"])])
                for i, p in enumerate(params)
            ]

    module.SamplingParams, module.LLM = SamplingParams, LLM
    return module


@pytest.fixture
def vllm(monkeypatch) -> types.ModuleType:
    module = fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return module


def test_sampling_maps_to_sampling_params_and_answers_regroup(vllm, tiny_model_dir) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with open_vllm("round-1/merged", tokenizer, torch.bfloat16) as backend:
        answers = backend.generate(
            PROMPTS, 3, Sampling(max_new_tokens=12, temperature=0.8, top_p=0.9), seed=4
        )
        greedy = backend.generate(PROMPTS[:1], 1, Sampling(max_new_tokens=5, temperature=None), seed=4)
    [engine] = vllm.LLM.instances
    assert engine.kwargs == {"model": "round-1/merged", "dtype": torch.bfloat16}
    inputs, params = engine.calls[0]
    assert inputs == [{"prompt_token_ids": prompt_ids(p, tokenizer)} for p in PROMPTS]  # the training tokens
    assert [{k: v for k, v in p.kwargs.items() if k != "seed"} for p in params] == [
        {"n": 3, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9}
    ] * 3
    assert len({p.kwargs["seed"] for p in params}) == 3  # one seed per prompt
    assert [[(a.text, a.num_tokens) for a in group] for group in answers] == [
        [(f"p{i}-s{j}", j + 1) for j in range(3)] for i in range(3)
    ]
    with open_vllm("x", tokenizer, torch.float32) as again:  # the same seed draws the same per-prompt seeds
        again.generate(PROMPTS, 3, Sampling(max_new_tokens=12, temperature=0.8, top_p=0.9), seed=4)
    assert [p.kwargs["seed"] for p in vllm.LLM.instances[1].calls[0][1]] == [p.kwargs["seed"] for p in params]
    greedy_params = engine.calls[1][1][0].kwargs
    assert greedy_params["temperature"] == 0.0 and "top_p" not in greedy_params
    assert [[a.text for a in group] for group in greedy] == [["p0-s0"]]
    assert backend.engine is None  # dropped on leaving, so training gets the GPU back


def test_vllm_missing_or_no_gpu_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(DpokitError, match="backend vllm: the vllm package is not installed"):
        check_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DpokitError, match="backend vllm: needs a CUDA GPU"):
        check_vllm()


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vllm and CUDA"
)
def test_real_vllm_greedy_matches_transformers(tiny_model_dir) -> None:
    """On a GPU with vllm: k answers per prompt, and greedy answers equal transformers `generate` (fp32)."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    greedy = Sampling(max_new_tokens=8, temperature=None)
    local = TransformersBackend(load_model(str(tiny_model_dir)).cuda(), tokenizer, 3).generate(
        PROMPTS, 1, greedy, seed=0
    )
    with open_vllm(str(tiny_model_dir), tokenizer, torch.float32) as backend:
        sampled = backend.generate(PROMPTS, 4, Sampling(max_new_tokens=8), seed=0)
        served = backend.generate(PROMPTS, 1, greedy, seed=0)
    assert [len(group) for group in sampled] == [4, 4, 4]
    assert all(1 <= a.num_tokens <= 8 for group in sampled for a in group)
    assert [[a.text for a in g] for g in served] == [[a.text for a in g] for g in local]


def test_iterate_with_vllm_unavailable_stops_before_round_1(tmp_path, tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    config = iterate_config(tmp_path, tiny_model_dir, "backend=vllm")
    with pytest.raises(DpokitError, match="backend vllm: the vllm package is not installed"):
        online_loop.iterate(config)
    assert not (tmp_path / "run" / "round-0").exists()
