"""The LLM judge against a real HTTP server on 127.0.0.1 speaking OpenAI chat-completions JSON.

The stub server (openai_stub.py, the `server` fixture) answers each request as its `reply(body, count)`
says, and records the requests.
"""

from __future__ import annotations

import logging
import re
import threading

import pytest
from openai_stub import StubServer
from test_loop import iterate_config

from dpokit.errors import DpokitError
from dpokit.online import http_judge
from dpokit.online import loop as online_loop
from dpokit.online.config import LLMJudgeConfig, load_iterate_config
from dpokit.online.http_judge import LLMJudge, parse_choice, parse_score
from dpokit.online.judges import build_judge

KEY = "sk-test-0123456789-do-not-leak"


def judge(server: StubServer, **fields) -> LLMJudge:
    config = {"url": server.url, "model": "stub", "timeout_s": 2.0, "retries": 2, "backoff_s": 0.001}
    return LLMJudge.load(LLMJudgeConfig(**{**config, **fields}))


def answer_of(body: dict) -> str:
    return re.search(r"Answer:\n(.*)\n\nReply", body["messages"][0]["content"], re.DOTALL).group(1)


REPLIES = {
    "a": "Score: 7",
    "b": "I'd say 7/10.",
    "c": "**8**",
    "d": '{"score": 6}',
    "e": "A fine answer, well written.",
    "f": "Score: NaN",
    "g": '{"score": "high"}',
    "h": "Between 3 and 4",
}


def test_pointwise_scores_parsed(server) -> None:
    server.reply = lambda body, count: (200, REPLIES[answer_of(body)])
    scores = judge(server).score(["Review a film."] * len(REPLIES), list(REPLIES))
    assert scores == [7.0, 7.0, 8.0, 6.0, None, None, None, None]
    assert set(server.paths) == {"/v1/chat/completions"}
    assert server.bodies[0]["model"] == "stub" and server.bodies[0]["temperature"] == 0.0
    assert "Review a film." in server.bodies[0]["messages"][0]["content"]


def test_parsers_on_free_text() -> None:
    assert parse_score("**Score:** 9") == 9.0 and parse_score("[[5]]") == 5.0 and parse_score("3") == 3.0
    assert parse_score("I rate it 7 out of 10") == 7.0 and parse_score('{"score": NaN}') is None
    assert [parse_choice(t) for t in ("A", "**B**", "Winner: A", '{"winner": "B"}', "[[A]]")] == list("ABABA")
    assert parse_choice("Answer B is better.") == "B"
    assert [parse_choice(t) for t in ("neither", '{"winner": ""}', "A or B?")] == [None, None, None]


def test_5xx_retried_until_success(server) -> None:
    server.reply = lambda body, count: (500, "") if count < 2 else (200, "Score: 9")
    assert judge(server).score(["p"], ["x"]) == [9.0]
    assert len(server.bodies) == 3


def test_429_retried_but_other_4xx_not(server) -> None:
    server.reply = lambda body, count: (429, "") if count == 0 else (200, "Score: 4")
    assert judge(server).score(["p"], ["x"]) == [4.0]
    server.bodies.clear()
    server.reply = lambda body, count: (400, "Score: 4")
    assert judge(server).score(["p"], ["x"]) == [None]
    assert len(server.bodies) == 1


def test_timeout_gives_none_after_retries(server) -> None:
    server.sleep_s = 0.5
    server.reply = lambda body, count: (200, "Score: 9")
    assert judge(server, timeout_s=0.05, retries=1).score(["p"], ["x"]) == [None]
    assert len(server.bodies) == 2  # the first try and one retry


def test_unreachable_server_gives_none(server) -> None:
    url = server.url
    server.shutdown()
    server.server_close()
    config = LLMJudgeConfig(url=url, model="m", retries=1, backoff_s=0.001, timeout_s=0.5)
    assert LLMJudge.load(config).score(["p"], ["x"]) == [None]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_requests_overlap_up_to_concurrency(server, concurrency) -> None:
    server.reply = lambda body, count: (200, "Score: 5")
    if concurrency > 1:
        server.barrier = threading.Barrier(concurrency)  # deadlocks (then times out) unless they overlap
    else:
        server.sleep_s = 0.02  # give a second request the chance to overlap, were it sent
    assert judge(server, concurrency=concurrency).score(["p"] * 8, ["x"] * 8) == [5.0] * 8
    assert server.max_in_flight == concurrency


def test_pairwise_round_robin(server) -> None:
    """The stub prefers the longer answer. Per prompt, each unordered pair is asked once with the order
    alternating: for 3 answers, 3 comparisons; a lone answer is never compared (None)."""

    def longer(body: dict, count: int) -> tuple[int, str]:
        a, b = re.search(
            r"Answer A:\n(.*)\n\nAnswer B:\n(.*)\n\nReply", body["messages"][0]["content"]
        ).groups()
        return 200, "Winner: A" if len(a) > len(b) else "**B**"

    server.reply = longer
    scores = judge(server, mode="pairwise").score(["p", "p", "p", "q"], ["x", "xxx", "xx", "alone"])
    assert scores == [0.0, 1.0, 0.5, None]
    assert len(server.bodies) == 3
    assert judge(server, mode="pairwise").compare(["p", "p"], ["long", "s"], ["s", "long"]) == [1.0, 0.0]


def test_pairwise_unparseable_reply_is_none(server) -> None:
    server.reply = lambda body, count: (200, "They are both fine.")
    assert judge(server, mode="pairwise").score(["p", "p"], ["x", "y"]) == [None, None]


def test_api_key_sent_but_never_logged_or_saved(
    server, tmp_path, tiny_model_dir, monkeypatch, caplog, capsys
) -> None:
    """A full one-round iterate run with the key in the environment: the server gets it as a Bearer token;
    logs, console and every file of the run directory never hold it (even with failed requests logged)."""
    monkeypatch.setenv("DPOKIT_TEST_JUDGE_KEY", KEY)
    server.reply = lambda body, count: (500, "") if count % 4 == 0 else (200, f"Score: {count % 7}")
    caplog.set_level(logging.DEBUG)
    config = iterate_config(tmp_path, tiny_model_dir, "rounds=1")
    config.judge = LLMJudgeConfig(
        url=server.url, model="stub", api_key_env="DPOKIT_TEST_JUDGE_KEY", retries=0, backoff_s=0.001
    )
    assert KEY not in repr(build_judge(config.judge, None))
    run_dir = online_loop.iterate(config)
    assert {h["Authorization"] for h in server.headers_seen} == {f"Bearer {KEY}"}
    assert "LLM judge" in caplog.text  # the failures were logged...
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err  # ...without the key
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "samples.jsonl" for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]


def test_missing_key_and_bad_config_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DPOKIT_NO_SUCH_KEY", raising=False)
    with pytest.raises(DpokitError, match="DPOKIT_NO_SUCH_KEY"):
        LLMJudge.load(
            LLMJudgeConfig(url="http://127.0.0.1:9/v1", model="m", api_key_env="DPOKIT_NO_SUCH_KEY")
        )
    base = "prompts: p.txt\neval_prompts: p.txt\njudge:\n  model: m\n"
    for extra, needle in [
        ("", "field 'judge.llm.url': required"),
        ("  url: ftp://x\n", "field 'judge.llm.url': must start with http"),
        ("  url: http://x\n  concurrency: 0\n", "field 'judge.llm.concurrency'"),
        (
            "  url: http://x\n  mode: pairwise\n  prompt: '{prompt} {answer}'\n",
            "needs {answer_a}, {answer_b}",
        ),
        ("  url: http://x\n  api_key: sk-x\n", "field 'judge.llm.api_key': unknown field"),
    ]:
        path = tmp_path / "c.yaml"
        path.write_text(base + extra)
        with pytest.raises(DpokitError, match=re.escape(needle)) as error:
            load_iterate_config(path)
        assert "\n" not in str(error.value)


def test_judging_shows_progress_per_request(server, monkeypatch) -> None:
    """Pairwise over 3 answers to p (3 comparisons) and 2 to q (1): the bar counts 4 requests of 4."""
    bars = []

    def recording(iterable, total, desc, **kwargs):
        bars.append({"total": total, "desc": desc, "done": 0})
        for item in iterable:
            bars[-1]["done"] += 1
            yield item

    monkeypatch.setattr(http_judge, "progress", recording)
    server.reply = lambda body, count: (200, "Winner: A")
    judge(server, mode="pairwise").score(["p", "p", "p", "q", "q"], ["x", "y", "z", "u", "v"])
    assert bars == [{"total": 4, "desc": "judging", "done": 4}] and len(server.bodies) == 4
