"""Checks of a preference dataset that need token counts or a model: truncation, chat template, stop tokens,
and the model's log-prob margin on every pair as the step-0 reference.

Rows are tokenized exactly as training tokenizes them (``tokenize_row``/``tokenize_rows``, TRL's
rules). Without a model, truncation is estimated from characters. Thresholds are module constants,
each with the reason for its value.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.data.rows import PreferenceRow
from dpokit.data.tokenize import TokenizedPair, tokenize_row, tokenize_rows
from dpokit.diagnostics.audit_text import (
    EXAMPLES_KEPT,
    MIN_PAIRS,
    Check,
    Pair,
    Stats,
    examples,
    percent,
    report,
)
from dpokit.diagnostics.findings import Finding, Symptom
from dpokit.logprobs import compute_logps, padded_pair_logps
from dpokit.models.loading import load_model, load_tokenizer

# Without a tokenizer, 4 characters per token: the usual average of BPE tokenizers on English text.
CHARS_PER_TOKEN = 4

# Truncation: critical when every row is dropped; a warning when any row is dropped, any pair becomes
# identical once cut, or 5% of the pairs lose answer tokens (a cut answer loses its EOS and often the
# part that made it better).
TRUNCATION_SHARE = 0.05

# Reference margins: log p(chosen) - log p(rejected), answer log-probs summed over tokens (nats) and
# cut at max_length as in training. A pair within 0.1 nats (a probability ratio under 1.105) is one
# the reference cannot tell apart, usually because the texts nearly match and their gradients cancel;
# a warning when 20% of the pairs are such ties. An easy pair: the reference already gives chosen
# e^5 (about 150) times the probability of rejected; worth knowing when half the pairs are easy.
TIE_MARGIN = 0.1
TIE_SHARE = 0.20
EASY_MARGIN = 5.0
EASY_SHARE = 0.50
BATCH_SIZE = 8

# Turn markers of common chat templates: a prompt holding one was rendered with that template.
TEMPLATE_MARKERS = {
    "ChatML": "<|im_start|>",
    "Llama 3": "<|start_header_id|>",
    "Llama 2 / Mistral": "[INST]",
    "Gemma": "<start_of_turn>",
    "Phi-3 / Zephyr": "<|user|>",
    "Alpaca": "### Instruction:",
}
TEMPLATE_PROBE = [{"role": "user", "content": "Hello"}]
RENDERED_EXAMPLE_CHARS = 500

# A row with its untruncated (prompt_ids, chosen_ids, rejected_ids).
Tokenized = tuple[PreferenceRow, list[int], list[int], list[int]]

_TEMPLATE_CAUSE = (
    "The prompts are not in the chat format the model was fine-tuned with; a template that differs from the "
    "SFT one is a known cause of gibberish after DPO."
)

SYMPTOMS: dict[str, Symptom] = {
    "truncation": Symptom(
        "warning",
        "Rows longer than max_length",
        "Prompts or answers longer than max_length: training drops those rows and cuts the answers, which loses "
        "their EOS and often the part that made chosen better.",
        "Raise max_length (gradient checkpointing keeps long rows affordable), or filter or shorten the long rows.",
    ),
    "chat_template_missing": Symptom(
        "critical",
        "The model's tokenizer has no chat template",
        _TEMPLATE_CAUSE,
        "Use the SFT model's tokenizer (it carries the template the model was tuned with), or set "
        "tokenizer.chat_template to that template.",
    ),
    "chat_template_error": Symptom(
        "critical",
        "The chat template fails on some rows",
        "The model's template rejects these conversations (a system role it does not support, roles that do not "
        "alternate); training would stop at the first of them.",
        "Fix the rows (merge the system message into the first user turn, make roles alternate) or use a template "
        "that accepts them.",
    ),
    "chat_template_mismatch": Symptom(
        "warning",
        "Prompts were rendered with another model's chat template",
        _TEMPLATE_CAUSE,
        "Render the prompts with the model's own template, or give conversational rows (lists of {role, content} "
        "messages) and let dpokit apply it.",
    ),
    "plain_text_prompts": Symptom(
        "info",
        "Plain-text prompts for a model with a chat template",
        "Standard rows are tokenized as raw text, so a chat-tuned model trains outside the format it was tuned "
        "in. This is right for a base model or completion-style data.",
        "For a chat model, give conversational rows (lists of {role, content} messages) so that dpokit renders "
        "them with the model's template.",
    ),
    "missing_eos": Symptom(
        "warning",
        "Answers without a stop token",
        "The chat template does not close the assistant turn with a token that stops generation, so the policy "
        "never learns where to stop (answers that ramble on).",
        "Use the SFT model's chat template, which closes the turn with its EOS, or set the tokenizer's eos_token "
        "to the template's end-of-turn token.",
    ),
    "reference_ties": Symptom(
        "warning",
        "The reference can hardly tell chosen from rejected",
        "Chosen and rejected too similar (or cut to the same tokens): their gradients nearly cancel and the loss "
        "stays flat (no learning).",
        "Verify the labels and the texts of these pairs; drop or regenerate pairs that differ only trivially.",
    ),
    "easy_pairs": Symptom(
        "info",
        "The reference already strongly prefers chosen in most pairs",
        "Pairs the model already ranks right by a wide margin carry little new signal.",
        "Mine hard negatives (keep pairs with a small margin), or generate fresh on-policy pairs (iterative DPO).",
    ),
}


def truncation(
    lengths: list[tuple[int, int, int, int]], max_length: int, estimated: bool, collapsed: list[int]
) -> Check:
    """Rows dropped (prompt alone reaches max_length) and pairs cut, by tokenize_rows' rules.

    ``lengths`` holds (line, prompt, chosen, rejected) token counts; ``collapsed`` the lines of pairs
    whose answers become identical once cut.
    """
    dropped = [line for line, prompt, _, _ in lengths if prompt >= max_length]
    cut = [
        line
        for line, prompt, chosen, rejected in lengths
        if prompt < max_length and prompt + max(chosen, rejected) > max_length
    ]
    share = len(cut) / len(lengths)
    stats = {
        "max_length": max_length,
        "estimated": estimated,
        "dropped": len(dropped),
        "truncated": len(cut),
        "identical_after_truncation": len(collapsed),
    }
    if not dropped and not cut:
        return stats, []
    parts = []
    if dropped:
        parts.append(
            f"{len(dropped)} rows have prompts of max_length tokens or more and are dropped "
            f"({examples(dropped)})"
        )
    if cut:
        parts.append(
            f"{len(cut)} of {len(lengths)} pairs ({percent(share)}) lose answer tokens ({examples(cut)})"
        )
    if collapsed:
        parts.append(f"{len(collapsed)} pairs become identical once cut ({examples(collapsed)})")
    how = (
        f"estimated at {CHARS_PER_TOKEN} characters per token; pass --model for exact counts"
        if estimated
        else "tokenized as in training"
    )
    evidence = f"With max_length={max_length} ({how}): " + "; ".join(parts) + "."
    data = {
        **stats,
        "dropped_lines": dropped[:EXAMPLES_KEPT],
        "truncated_lines": cut[:EXAMPLES_KEPT],
        "identical_lines": collapsed[:EXAMPLES_KEPT],
    }
    severity = "warning" if dropped or collapsed or share >= TRUNCATION_SHARE else "info"
    if len(dropped) == len(lengths):
        severity = "critical"  # no pair is left: training stops
    return stats, [report(SYMPTOMS, "truncation", evidence, data, severity)]


def estimated_truncation(pairs: list[Pair], max_length: int) -> Check:
    """Truncation from character counts, when no tokenizer is given (chat-template tokens not counted)."""

    def tokens(text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    lengths = [(pair.line, tokens(pair.prompt), tokens(pair.chosen), tokens(pair.rejected)) for pair in pairs]
    return truncation(lengths, max_length, estimated=True, collapsed=[])


def template_check(tokenizer: PreTrainedTokenizerBase, rows: list[PreferenceRow]) -> Check:
    """Compare the data's chat format with the model's chat template.

    Conversational rows are rendered with the model's template, so only a missing template matters
    here (rendering errors show when tokenizing). Standard rows are tokenized as raw text: the check
    looks in the prompts for the turn markers of common templates (TEMPLATE_MARKERS) and compares
    them with the markers the model's own template writes for a probe conversation.
    """
    name, template = tokenizer.name_or_path, tokenizer.chat_template
    if rows[0].conversational:
        if template is None:
            evidence = (
                f"The rows are conversational (lists of messages) but {name} has no chat_template, so "
                "they cannot be rendered: training would fail."
            )
            return {"model_template": False}, [report(SYMPTOMS, "chat_template_missing", evidence, {})]
        return {"model_template": True}, []
    found = {
        family: [row.line for row in rows if marker in row.prompt]
        for family, marker in TEMPLATE_MARKERS.items()
    }
    found = {family: lines for family, lines in found.items() if lines}
    stats = {
        "model_template": template is not None,
        "prompt_markers": {f: len(lines) for f, lines in found.items()},
    }
    if template is None:
        return stats, []
    probe = tokenizer.apply_chat_template(TEMPLATE_PROBE, tokenize=False, add_generation_prompt=True)
    foreign = {family: lines for family, lines in found.items() if TEMPLATE_MARKERS[family] not in probe}
    if foreign:
        markers = "; ".join(
            f"{len(lines)} prompts hold the {family} marker {TEMPLATE_MARKERS[family]!r} ({examples(lines)})"
            for family, lines in foreign.items()
        )
        evidence = (
            f"{markers}, which {name}'s own template does not write (it renders a user turn as {probe!r})."
        )
        data = {"foreign_markers": {family: lines[:EXAMPLES_KEPT] for family, lines in foreign.items()}}
        return stats, [report(SYMPTOMS, "chat_template_mismatch", evidence, data)]
    if not found:
        evidence = (
            f"None of the {len(rows)} prompts holds a chat-template turn marker, while {name} has a chat "
            f"template (it renders a user turn as {probe!r})."
        )
        return stats, [report(SYMPTOMS, "plain_text_prompts", evidence, {})]
    return stats, []


def tokenized(
    tokenizer: PreTrainedTokenizerBase, rows: list[PreferenceRow]
) -> tuple[list[Tokenized], Stats, list[Finding]]:
    """Untruncated ids of the rows the chat template can render, and a finding for those it cannot.

    The stats show the first renderable conversational row as the template writes it, for the eye.
    """
    done, failed = [], []
    for row in rows:
        try:
            done.append((row, *tokenize_row(tokenizer, row)))
        except TemplateError as error:
            failed.append((row.line, str(error)))
    stats: Stats = {"template_errors": len(failed)}
    if done and done[0][0].conversational:
        rendered = tokenizer.apply_chat_template(done[0][0].prompt + done[0][0].chosen, tokenize=False)
        stats["rendered_example"] = rendered[:RENDERED_EXAMPLE_CHARS]
    if not failed:
        return done, stats, []
    lines = [line for line, _ in failed]
    evidence = f"{len(failed)} of {len(rows)} rows fail to render ({examples(lines)}); the first error: {failed[0][1]}"
    return done, stats, [report(SYMPTOMS, "chat_template_error", evidence, {"lines": lines[:EXAMPLES_KEPT]})]


def stop_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """Token ids at which generation stops: the tokenizer's EOS and the model's generation_config EOS."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return ids - {None}


def eos_check(done: list[Tokenized], stops: set[int]) -> Check:
    """Answers whose token ids hold no stop token: the policy would never learn where to stop.

    Standard rows get the EOS appended by the tokenizer step (TRL's rule), so only conversational
    rows, whose turn ends are the chat template's, can normally fail this.
    """
    missing = {
        side: [row.line for row, _, *answers in done if not stops & set(answers[index])]
        for index, side in enumerate(("chosen", "rejected"))
    }
    source = (
        "the chat template's" if done[0][0].conversational else "appended by the tokenizer step (TRL's rule)"
    )
    stats = {
        "stop_token_ids": sorted(stops),
        "eos_source": source,
        **{f"missing_{side}": len(lines) for side, lines in missing.items()},
    }
    if not any(missing.values()):
        return stats, []
    parts = [f"{len(lines)} {side} answers ({examples(lines)})" for side, lines in missing.items() if lines]
    evidence = (
        f"{' and '.join(parts)} hold no stop token (ids {sorted(stops)}) once tokenized; the EOS is {source}."
    )
    return stats, [
        report(
            SYMPTOMS,
            "missing_eos",
            evidence,
            {side: lines[:EXAMPLES_KEPT] for side, lines in missing.items()},
        )
    ]


def margin_check(model: PreTrainedModel, pad_token_id: int, pairs: list[TokenizedPair]) -> Check:
    """The model as step-0 reference: log p(chosen) - log p(rejected) per pair, summed answer log-probs."""
    logps = compute_logps(
        model, pairs, partial(padded_pair_logps, pad_token_id=pad_token_id), BATCH_SIZE, "audit log-probs"
    )
    margins = (logps.chosen - logps.rejected).numpy()
    ties = [pair.line for pair, margin in zip(pairs, margins) if abs(margin) < TIE_MARGIN]
    easy = [pair.line for pair, margin in zip(pairs, margins) if margin >= EASY_MARGIN]
    n = len(pairs)
    stats = {
        "margin_mean": float(margins.mean()),
        "margin_median": float(np.median(margins)),
        "margin_p10": float(np.percentile(margins, 10)),
        "margin_p90": float(np.percentile(margins, 90)),
        "reference_accuracy": float(np.mean(margins > 0)),
        "ties": len(ties) / n,
        "easy": len(easy) / n,
        "lines": [pair.line for pair in pairs],
        "margins": margins.tolist(),
    }
    summary = (
        f"the margin log p(chosen) - log p(rejected) has mean {stats['margin_mean']:.2f} and median "
        f"{stats['margin_median']:.2f} nats over {n} pairs"
    )
    findings = []
    if n >= MIN_PAIRS and stats["ties"] >= TIE_SHARE:
        evidence = (
            f"{len(ties)} of {n} pairs ({percent(stats['ties'])}) have |margin| < {TIE_MARGIN} nats "
            f"({examples(ties)}); {summary}."
        )
        data = {"count": len(ties), "share": stats["ties"], "lines": ties[:EXAMPLES_KEPT]}
        findings.append(report(SYMPTOMS, "reference_ties", evidence, data))
    if n >= MIN_PAIRS and stats["easy"] >= EASY_SHARE:
        evidence = (
            f"{len(easy)} of {n} pairs ({percent(stats['easy'])}) have margin >= {EASY_MARGIN} nats "
            f"({examples(easy)}); {summary}."
        )
        data = {"count": len(easy), "share": stats["easy"], "lines": easy[:EXAMPLES_KEPT]}
        findings.append(report(SYMPTOMS, "easy_pairs", evidence, data))
    return stats, findings


def model_checks(rows: list[PreferenceRow], model_name: str, max_length: int) -> tuple[Stats, list[Finding]]:
    """Chat template, stop tokens, exact truncation and reference margins, with the model's tokenizer."""
    tokenizer = load_tokenizer(model_name)
    stats: Stats = {}
    stats["chat_template"], findings = template_check(tokenizer, rows)
    if any(finding.code == "chat_template_missing" for finding in findings):
        return stats, findings  # nothing can be tokenized
    done, template_stats, found = tokenized(tokenizer, rows)
    stats["chat_template"].update(template_stats)
    findings += found
    if not done:
        return stats, findings
    model = load_model(model_name).eval()
    stats["eos"], found = eos_check(done, stop_tokens(tokenizer, model))
    findings += found
    # The pairs as training sees them: cut at max_length, over-long prompts dropped.
    pairs = tokenize_rows(tokenizer, [row for row, *_ in done], max_length).pairs
    collapsed = [pair.line for pair in pairs if pair.chosen_ids == pair.rejected_ids]
    lengths = [(row.line, len(prompt), len(chosen), len(rejected)) for row, prompt, chosen, rejected in done]
    stats["truncation"], found = truncation(lengths, max_length, estimated=False, collapsed=collapsed)
    findings += found
    if pairs:
        stats["reference"], found = margin_check(model, tokenizer.pad_token_id, pairs)
        findings += found
    return stats, findings
