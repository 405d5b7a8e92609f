"""The `openai` generation backend: a real completions server started through server_command
(completions_server.py, transformers on the tiny model), the requests it sends, and its failure paths."""

from __future__ import annotations

import os
import re
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console
from test_loop import iterate_config

from dpokit.errors import DpokitError
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.online import loop as online_loop
from dpokit.online.backends import open_backend
from dpokit.online.config import OpenAIBackendConfig, load_iterate_config
from dpokit.online.generation import Sampling, TransformersBackend, prompt_ids
from dpokit.online.openai_backend import OpenAIBackend
from dpokit.online.openai_http import OpenAIClient
from dpokit.online.server import serve

SERVER = Path(__file__).with_name("completions_server.py")
COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVER))} --model {{policy}} --port {{port}}"
PROMPTS = [
    "The movie was",
    [{"role": "user", "content": "What color is the sky?"}],
    "Hello there, how are you",
]
GREEDY = Sampling(max_new_tokens=8, temperature=None)


def openai_loop(tmp_path: Path, model: Path, *overrides: str) -> online_loop.Loop:
    config = iterate_config(tmp_path, model, "backend=openai", f"openai.server_command={COMMAND}", *overrides)
    return online_loop.Loop(config, Path(config.output_dir), Console(quiet=True), None, [], [])


def texts(groups) -> list[list[tuple[str, int]]]:
    return [[(a.text, a.num_tokens) for a in group] for group in groups]


@pytest.mark.parametrize("prompt_format", ["tokens", "text"])
def test_served_policy_greedy_equals_transformers_backend(tmp_path, tiny_model_dir, prompt_format) -> None:
    """The server, started with the policy's directory, answers greedily exactly what transformers `generate`
    does here, whether it gets the prompt's token ids or their text; k requests give k answers; sampling is
    repeatable by seed; the server is stopped on leaving."""
    local = TransformersBackend(
        load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), batch_size=3
    ).generate(PROMPTS, 1, GREEDY, seed=0)
    loop = openai_loop(tmp_path, tiny_model_dir, f"openai.prompt_format={prompt_format}")
    log = tmp_path / "server.log"
    with open_backend(loop, 0, log) as backend:
        greedy = backend.generate(PROMPTS, 2, GREEDY, seed=0)
        sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9)
        sampled, again = (backend.generate(PROMPTS, 3, sampling, seed=5) for _ in range(2))
        url = backend.client.url
    assert texts(greedy) == [[answer, answer] for [answer] in texts(local)]
    assert [len(group) for group in sampled] == [3, 3, 3]
    assert all(1 <= a.num_tokens <= 6 for group in sampled for a in group)
    assert texts(sampled) == texts(again)
    assert len({a.text for group in sampled for a in group}) > 3  # each request its own seed
    assert f"serving {tiny_model_dir}" in log.read_text()  # {policy} filled with the starting model
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/models", timeout=5)


@pytest.mark.slow  # three server starts and a training round
def test_iterate_round_with_server_command(tmp_path, tiny_model_dir) -> None:
    """A one-round run on `backend: openai`: each generation and evaluation stage starts the server on that
    stage's policy (round 1's LoRA adapter merged into round-1/merged) and records k answers with lengths."""
    config = iterate_config(
        tmp_path, tiny_model_dir, "rounds=1", "backend=openai", f"openai.server_command={COMMAND}"
    )
    console = Console(record=True, width=400)
    run_dir = online_loop.iterate(config, console=console)
    # One line per server start (round 0's evaluation, round 1's generation and evaluation), before the wait.
    starts = [
        line for line in console.export_text().splitlines() if line.startswith("starting the server on")
    ]
    assert len(starts) == 3 and str(run_dir / "round-1" / "server-generation.log") in starts[1]
    records = online_loop.read_jsonl(run_dir / "round-1" / "generations.jsonl")
    assert all(len(r["answers"]) == 3 and len(r["num_tokens"]) == 3 for r in records)
    assert (run_dir / "round-1" / "merged" / "config.json").exists()
    assert f"serving {tiny_model_dir}" in (run_dir / "round-1" / "server-generation.log").read_text()
    served = (run_dir / "round-1" / "server-evaluation.log").read_text()
    assert f"serving {run_dir / 'round-1' / 'merged'}" in served
    rounds = online_loop.read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and all(r["kl"] is not None for r in rounds)


def test_requests_carry_prompt_ids_sampling_and_one_seed_each(server, tiny_model_dir) -> None:
    """k requests per prompt (n=1), the prompt as the training token ids, the sampling fields, a distinct
    seed per request, extra_body merged in; answers come back grouped by prompt, with usage's token count."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    server.reply = lambda body, count: (200, f"{len(body['prompt'])} {body.get('seed')} x")
    config = OpenAIBackendConfig(url=server.url, model="policy", extra_body={"top_k": 0}, concurrency=4)
    backend = OpenAIBackend(
        OpenAIClient.from_config(server.url, config, "openai"), "policy", tokenizer, config
    )
    answers = backend.generate(PROMPTS, 2, Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9), seed=3)
    ids = [prompt_ids(p, tokenizer) for p in PROMPTS]
    assert sorted(map(tuple, (b["prompt"] for b in server.bodies))) == sorted(
        tuple(i) for i in ids for _ in "ab"
    )
    assert {
        (b["model"], b["max_tokens"], b["n"], b["temperature"], b["top_p"], b["top_k"]) for b in server.bodies
    } == {("policy", 5, 1, 0.7, 0.9, 0)}
    assert len({b["seed"] for b in server.bodies}) == 6
    assert set(server.paths) == {"/v1/completions"}
    assert [[a.text.split()[0] for a in group] for group in answers] == [[str(len(i))] * 2 for i in ids]
    assert all(a.num_tokens == 3 for group in answers for a in group)
    again = backend.generate(PROMPTS, 2, Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9), seed=3)
    assert texts(again) == texts(answers)  # the same seeds again
    server.bodies.clear()
    backend.generate(PROMPTS[:1], 1, GREEDY, seed=3)
    assert server.bodies[0]["temperature"] == 0.0 and "seed" not in server.bodies[0]


def client_backend(server, tiny_model_dir, **fields) -> OpenAIBackend:
    config = OpenAIBackendConfig(
        **{"url": server.url, "model": "m", "timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, **fields}
    )
    client = OpenAIClient.from_config(server.url, config, "openai")
    return OpenAIBackend(client, "m", load_tokenizer(str(tiny_model_dir)), config)


def test_5xx_retried_then_answered(server, tiny_model_dir) -> None:
    server.reply = lambda body, count: (500, "") if count < 2 else (200, "fine")
    answers = client_backend(server, tiny_model_dir).generate(["p"], 1, GREEDY, seed=0)
    assert texts(answers) == [[("fine", 1)]] and len(server.bodies) == 3


@pytest.mark.parametrize(
    ("status", "sleep_s", "needle", "requests"),
    [
        (500, 0.0, "failed after 3 attempts (last: HTTP 500)", 3),
        (200, 0.5, "failed after 3 attempts", 3),  # each try times out
        (404, 0.0, "HTTP 404", 1),  # a 4xx is not retried
    ],
)
def test_failing_server_stops_the_stage(server, tiny_model_dir, status, sleep_s, needle, requests) -> None:
    """A request that still fails after its retries stops generation with one line naming the URL (a lost
    answer would bias the pairs); the queued requests are dropped, not sent: with one request in flight at a
    time, at most the one already started after the failure gets its tries too."""
    server.reply = lambda body, count: (status, "late")
    server.sleep_s = sleep_s
    backend = client_backend(server, tiny_model_dir, timeout_s=0.1, concurrency=1)
    with pytest.raises(DpokitError, match=re.escape(needle)) as error:
        backend.generate(["p"] * 10, 1, GREEDY, seed=0)
    assert f"{server.url}/completions" in str(error.value) and "\n" not in str(error.value)
    assert requests <= len(server.bodies) <= 2 * requests


def test_reply_without_choices_is_an_error(server, tiny_model_dir) -> None:
    server.reply = lambda body, count: (200, None)
    with pytest.raises(DpokitError, match=r"no choices\[0\]\.text"):
        client_backend(server, tiny_model_dir).generate(["p"], 1, GREEDY, seed=0)


def test_server_that_exits_quotes_its_output(tmp_path) -> None:
    command = f"{shlex.quote(sys.executable)} -c \"import sys; print('loading', sys.argv[1]); sys.exit('boom: bad weights')\" {{policy}}"
    with pytest.raises(DpokitError, match="exited with code 1 before answering") as error:
        with serve(command, "/models/p", "http://127.0.0.1:{port}/v1", tmp_path / "s.log", 60):
            pass
    assert "loading /models/p | boom: bad weights" in str(error.value) and "\n" not in str(error.value)


def test_server_that_never_answers_is_stopped(tmp_path) -> None:
    """The wait is bounded; when it runs out the server process is killed (and reaped) before the error."""
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('starting'); time.sleep(600)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    with pytest.raises(
        DpokitError, match=r"no answer at http://127\.0\.0\.1:\d+/v1/models within 1\.5s"
    ) as error:
        with serve(command, "p", "http://127.0.0.1:{port}/v1", tmp_path / "s.log", 1.5):
            pass
    assert "starting" in str(error.value)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_missing_command_is_one_line(tmp_path) -> None:
    with pytest.raises(DpokitError, match="cannot run 'no-such-server-binary'"):
        with serve(
            "no-such-server-binary {policy}", "p", "http://127.0.0.1:{port}/v1", tmp_path / "s.log", 5
        ):
            pass


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("", "field 'openai': required with backend: openai"),
        ("openai:\n  server_command: serve --port {port}\n", "field 'openai.server_command': needs {policy}"),
        ("openai:\n  server_command: serve {policy}\n", "field 'openai.server_command': needs {port}"),
        ("openai:\n  model: m\n", "field 'openai.url': your server's address"),
        ("openai:\n  url: http://h:1/v1\n", "field 'openai.model': the name your server serves"),
        ("openai:\n  url: ftp://h\n  model: m\n", "field 'openai.url': must start with http"),
        ("openai:\n  url: http://h/v1\n  model: m\n  prompt_format: chat\n", "field 'openai.prompt_format'"),
    ],
)
def test_openai_config_errors_name_the_field(tmp_path, section, needle) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("prompts: p.txt\neval_prompts: p.txt\nbackend: openai\n" + section)
    with pytest.raises(DpokitError, match=re.escape(needle)) as error:
        load_iterate_config(path)
    assert "\n" not in str(error.value)
    path.write_text("prompts: p.txt\neval_prompts: p.txt\nopenai:\n  url: http://h/v1\n  model: m\n")
    with pytest.raises(DpokitError, match="field 'openai': only used with backend: openai"):
        load_iterate_config(path)
