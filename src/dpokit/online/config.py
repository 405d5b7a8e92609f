"""The `dpokit iterate` configuration: the on-policy loop's fields, with a nested `train:` RunConfig.

The `train:` section is exactly a `dpokit train` config (the same fields and validation); the loop sets its
`model`, `output_dir` and `reference_model` per round.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from dpokit.config import RunConfig, parse_override, range_warnings, read_config_file, validation_error
from dpokit.errors import DpokitError

# Defaults of the nested train config that differ from `dpokit train`'s: the loop evaluates on its own
# held-out prompts, so the preference eval set and the periodic samples of the demo are off unless asked.
TRAIN_DEFAULTS = {"eval_data": None, "sample_prompts": None}


POINTWISE_PROMPT = (
    "Rate how well the answer responds to the prompt, from 1 (useless) to 10 (excellent).\n\n"
    "Prompt:\n{prompt}\n\nAnswer:\n{answer}\n\nReply with one line: Score: N"
)
PAIRWISE_PROMPT = (
    "Which answer responds better to the prompt?\n\nPrompt:\n{prompt}\n\n"
    "Answer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\nReply with one line: Winner: A or Winner: B"
)
# The placeholders each mode's template must hold, filled by plain substitution (other braces stay as written).
PLACEHOLDERS = {"pointwise": ("{prompt}", "{answer}"), "pairwise": ("{prompt}", "{answer_a}", "{answer_b}")}


def fill(template: str, values: dict[str, str]) -> str:
    """Substitute the {name} placeholders of a config template in one pass: text inside a value is never
    re-filled, and other braces (unknown names, JSON) stay as written."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


class HTTPClientConfig(BaseModel):
    """How requests reach an OpenAI-compatible API: shared by the LLM judge and the `openai` backend."""

    model_config = ConfigDict(extra="forbid")

    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key, sent as a Bearer token and never "
        "logged or saved. None: no Authorization header (a local server).",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once (a thread pool); 4-32.")
    timeout_s: float = Field(60.0, gt=0.0, description="Seconds one request may take before it is retried.")
    retries: int = Field(
        3,
        ge=0,
        description="Retries of a request after a timeout, connection error, 429 or 5xx (not other 4xx).",
    )
    backoff_s: float = Field(
        1.0, ge=0.0, description="Wait before the first retry in seconds; doubled at each further retry."
    )


def _check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError("field 'url': must start with http:// or https://")


class LLMJudgeConfig(HTTPClientConfig):
    """An LLM judge over an OpenAI-compatible chat-completions API: `judge:` given as a mapping."""

    url: str = Field(
        description="Base URL of the API, e.g. http://127.0.0.1:8080/v1 (requests go to URL/chat/completions)."
    )
    model: str = Field(description="The `model` field of each request.")
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        description="pointwise: a score per answer, parsed from the reply. pairwise: A/B comparisons; "
        "an answer's score is its share of wins in a round robin against the other answers to its prompt.",
    )
    prompt: str | None = Field(
        None,
        description="The user message template: {prompt} and {answer} (pointwise) or {prompt}, {answer_a} "
        "and {answer_b} (pairwise). None: a built-in template asking for 'Score: N' (1-10) or 'Winner: A|B'.",
    )
    max_tokens: int = Field(64, ge=1, description="Tokens the judge may reply with.")
    temperature: float = Field(
        0.0, ge=0.0, description="Judge sampling temperature; 0 for repeatable scores."
    )

    @model_validator(mode="after")
    def _check(self) -> LLMJudgeConfig:
        _check_url(self.url)
        if self.prompt is not None:
            missing = [p for p in PLACEHOLDERS[self.mode] if p not in self.prompt]
            if missing:
                raise ValueError(f"field 'prompt': a {self.mode} template needs {', '.join(missing)}")
        return self

    @property
    def template(self) -> str:
        return self.prompt or (POINTWISE_PROMPT if self.mode == "pointwise" else PAIRWISE_PROMPT)


# `judge:` is a string naming a built-in judge, or a mapping configuring the LLM judge; the discriminator
# picks the branch first, so a bad mapping reports its own field (judge.llm.url), not both branches.
JudgeSpec = Annotated[
    Annotated[str, Tag("spec")] | Annotated[LLMJudgeConfig, Tag("llm")],
    Discriminator(lambda value: "llm" if isinstance(value, dict | LLMJudgeConfig) else "spec"),
]


class OpenAIBackendConfig(HTTPClientConfig):
    """Generation by an OpenAI-compatible completions server: the `openai:` section of `backend: openai`.

    Each answer is one request to URL/completions (k per prompt, each with its own seed), so its
    `usage.completion_tokens` is that answer's length.
    """

    url: str = Field(
        "http://127.0.0.1:{port}/v1",
        description="Base URL of the server (requests go to URL/completions); {port} is the port dpokit "
        "picks for server_command.",
    )
    model: str = Field(
        "{policy}",
        description="The `model` field of each request. {policy}, the served policy's path, is the name "
        "vLLM serves a model under when started with --model {policy}. Without server_command: the name "
        "your server knows the model by.",
    )
    server_command: str | None = Field(
        None,
        description="A command serving one model, run for each generation and evaluation stage with "
        "{policy} (the round's policy: a model directory, LoRA adapters merged into round-N/merged) and "
        "{port} (a free port on 127.0.0.1) filled in; dpokit waits until it answers and stops it afterwards. "
        "None: the server at `url` is used as it is, which is on-policy only if you load each round's "
        "policy into it yourself.",
    )
    startup_timeout_s: float = Field(
        600.0, gt=0.0, description="Seconds the started server may take to answer before the run stops."
    )
    prompt_format: Literal["tokens", "text"] = Field(
        "tokens",
        description="tokens: the prompt's token ids exactly as training computes them (vLLM, SGLang, "
        "llama.cpp's own server and OpenAI accept token arrays). text: the chat-templated prompt as a "
        "string for servers that take only text (llama-cpp-python's); its tokens match training only if "
        "the server parses special tokens and adds no BOS of its own.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="More fields for every request, e.g. {top_k: 0, min_p: 0.0, repeat_penalty: 1.0} for "
        "llama.cpp, whose default sampling filters are not the policy's own distribution.",
    )

    @model_validator(mode="after")
    def _check(self) -> OpenAIBackendConfig:
        _check_url(self.url)
        if self.server_command is not None:
            if "{policy}" not in self.server_command:
                raise ValueError("field 'server_command': needs {policy}, the path of the round's policy")
            if "{port}" in self.url and "{port}" not in self.server_command:
                raise ValueError("field 'server_command': needs {port}, the port in url")
        elif "{port}" in self.url:
            raise ValueError(
                "field 'url': your server's address ({port} is filled in for server_command only)"
            )
        elif "{policy}" in self.model:
            raise ValueError(
                "field 'model': the name your server serves the policy under "
                "({policy} is filled in for server_command only)"
            )
        return self


class IterateConfig(BaseModel):
    """Everything a `dpokit iterate` run needs. Field descriptions are the reference documentation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train: RunConfig = Field(
        default_factory=lambda: RunConfig(**TRAIN_DEFAULTS),
        description="The training of each round: a `dpokit train` config. `model` is the starting policy; "
        "output_dir and reference_model are set per round. eval_data and sample_prompts default to null here.",
    )
    rounds: int = Field(3, ge=1, description="Rounds of generate -> judge -> pair -> train -> evaluate.")
    prompts: str = Field(
        description="Training prompts: a .txt file (one per line), or JSONL/JSON/Parquet/CSV rows with a "
        "'prompt' field (a string or a list of {role, content} messages); builtin: names work too."
    )
    eval_prompts: str = Field(description="Held-out prompts for the per-round evaluation, same formats.")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Use a seeded random subset of this many prompts each round; None: all."
    )
    backend: Literal["transformers", "vllm", "openai"] = Field(
        "transformers",
        description="Generation backend: transformers `generate` (CPU or GPU); vllm (needs the vllm package "
        "and a CUDA GPU); openai, an OpenAI-compatible completions server configured by `openai:`.",
    )
    openai: OpenAIBackendConfig | None = Field(
        None,
        description="The server of `backend: openai` (url, server_command, ...; see OpenAIBackendConfig).",
    )
    samples_per_prompt: int = Field(4, ge=2, description="k: answers sampled per prompt (at least 2).")
    temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature (1.0 samples the policy itself)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 disables it.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer at most.")
    generation_batch_size: int = Field(
        16, ge=1, description="Prompts per `generate` call (each yields k sequences, so k x this rows)."
    )
    judge: JudgeSpec = Field(
        "vader",
        description="Scores each answer: 'vader' (sentiment in [-1, 1]), 'length' (characters), "
        "'regex:PATTERN' (matches), 'keywords:a,b' (occurrences, case-insensitive), 'python:module:function' "
        "(called with (prompts, answers), returns a float or None per answer), 'reward-model:DIR' "
        "(an AutoModelForSequenceClassification checkpoint), or a mapping: an LLM judge over an "
        "OpenAI-compatible API (url, model, mode, ...; see LLMJudgeConfig).",
    )
    pairing: Literal["best_vs_worst", "best_vs_random", "best_vs_second"] = Field(
        "best_vs_worst", description="Which answer is rejected against the best one."
    )
    min_score_gap: float = Field(
        0.0, ge=0.0, description="Keep a pair only when chosen - rejected >= this (ties are always dropped)."
    )
    hard_negative_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Keep only this fraction of the pairs: those with the smallest implicit-reward margin "
        "beta*((pi-ref)(chosen) - (pi-ref)(rejected)) under the current policy. None keeps all.",
    )
    reference: Literal["initial", "previous"] = Field(
        "initial",
        description="The DPO reference of each round: the starting model (RLHFlow's choice) or the previous "
        "round's policy.",
    )
    min_pairs: int = Field(8, ge=1, description="A round with fewer pairs than this stops the run.")
    output_dir: str = Field("runs/iterate", description="Run directory: round-N/ folders and rounds.jsonl.")

    @model_validator(mode="after")
    def _check(self) -> IterateConfig:
        if self.reference == "previous" and self.train.reference_model is not None:
            raise ValueError(
                "field 'reference': 'previous' refreshes the reference every round; remove train.reference_model"
            )
        if self.backend == "openai" and self.openai is None:
            raise ValueError("field 'openai': required with backend: openai (url or server_command)")
        if self.backend != "openai" and self.openai is not None:
            raise ValueError(f"field 'openai': only used with backend: openai, not {self.backend}")
        return self


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (train.beta) in nested mappings."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise DpokitError(f"override {key!r}: {part} is not a section")
    data[last] = value


def load_iterate_config(path: Path | None, overrides: list[str] = ()) -> IterateConfig:
    """Read a YAML iterate config, apply key=value overrides (train.beta=0.2 for the train section),
    validate, and warn on risky training values; errors are one line naming the field."""
    data = read_config_file(path)
    for text in overrides:
        _set(data, *parse_override(text))
    train = data.get("train", {})
    if not isinstance(train, dict):
        raise DpokitError(f"{path}: field 'train': expected a mapping of field: value")
    data["train"] = {**TRAIN_DEFAULTS, **train}
    try:
        config = IterateConfig(**data)
    except ValidationError as error:
        raise validation_error(error, path) from None
    for note in range_warnings(config.train):
        warnings.warn(f"train: {note}", UserWarning, stacklevel=2)
    return config
