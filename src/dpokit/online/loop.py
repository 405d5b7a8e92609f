"""The on-policy loop: each round generates, judges, pairs, trains and evaluates, each stage saved atomically.

dpokit iterate my-iterate.yaml                 # R rounds into output_dir
dpokit iterate my-iterate.yaml --resume        # continue from the last finished stage
torchrun --standalone --nproc-per-node 2 -m dpokit.cli iterate my-iterate.yaml --distributed ddp

From Python: `iterate(load_iterate_config(Path("my-iterate.yaml")))`. Layout of RUN_DIR:
  round-N/generations.jsonl  k answers per prompt          (generation)
  round-N/samples.jsonl      the same with judge scores    (judging)
  round-N/report.json, pairs.jsonl                          (pairing)
  round-N/train/             a `dpokit train` run directory (training; final/ is round N's policy, with LoRA
                             its adapter, which round N+1 trains on; `reference: previous` with LoRA merges
                             it into round-N/policy)
  round-N/eval_samples.jsonl, one line of rounds.jsonl     (evaluation; round 0 is the starting policy)
A stage whose output exists is never run again. Under a launcher every rank generates its share of the
batches and trains; rank 0 alone judges, pairs, evaluates and writes (see online/ranks.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from dpokit.atomic import write_atomic
from dpokit.data.rows import Text
from dpokit.distributed import resolve_engine
from dpokit.errors import DpokitError
from dpokit.models.loading import (
    adapter_base,
    is_peft,
    load_adapter,
    load_model,
    load_tokenizer,
    reference_context,
)
from dpokit.online.backends import check_backend, open_backend
from dpokit.online.config import IterateConfig
from dpokit.online.evaluation import judge_held_out, kl_estimate, summarize
from dpokit.online.generation import Answer, Sampling
from dpokit.online.judges import Judge, build_judge
from dpokit.online.models import inference_device, load_frozen, preference_row, row_logps
from dpokit.online.pairs import DROP_GAP, DROP_JUDGE, DROP_MINING, hard_negatives, implicit_margins, pick_pair
from dpokit.online.prompts import read_prompts
from dpokit.online.ranks import Ranks, start_ranks, stop_ranks
from dpokit.train.output import save_final

# Generation batch b is seeded seed + b * BATCH_SEED_STRIDE: its answers depend on its own prompts and seed
# only, whichever process draws it, and no two batches of a run (seed + round) share a seed.
BATCH_SEED_STRIDE = 1 << 20

# report.json's note when hard_negative_fraction is set but no margin can rank the pairs: every pair is kept.
MINING_SKIPPED = (
    "the policy is its own reference in round 1 (every implicit-reward margin is 0); all pairs kept"
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


@dataclass
class Loop:
    """What every stage of every round shares."""

    config: IterateConfig
    run_dir: Path
    console: Console
    judge: Judge | None  # rank 0's; None on the other ranks, which do not judge
    train_prompts: list[Text]
    eval_prompts: list[Text]
    ranks: Ranks = field(default_factory=Ranks)
    distributed: str | None = None  # `dpokit train`'s --distributed: the engine every round trains with

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.config.train.model, self.config.train.trust_remote_code)

    def round_dir(self, n: int) -> Path:
        return self.run_dir / f"round-{n}"

    @property
    def merges(self) -> bool:
        """LoRA with `reference: previous`: each round's adapter is merged into a full model, which the next
        round trains fresh adapters on and, with them disabled, uses as its reference (one copy of the
        weights). With `reference: initial` a round trains the previous round's adapter on instead."""
        return self.config.train.use_lora and self.config.reference == "previous"

    def policy(self, n: int) -> str:
        """The policy after round n: the starting model for n = 0, then round n's train/final (a LoRA adapter
        directory, whose base is the starting model), or its merge when `merges`."""
        if n == 0:
            return self.config.train.model
        return str(self.round_dir(n) / ("policy" if self.merges else "train/final"))

    def reference(self, n: int) -> str | None:
        """The DPO reference of round n as a separate model, or None: round n's starting policy, policy(n-1),
        is its own reference, with its LoRA adapters disabled when it has any (the starting model under
        `reference: initial`, the merged previous policy under `previous`)."""
        train = self.config.train
        if train.reference_model is not None:  # only allowed with `reference: initial`
            return train.reference_model
        if self.config.reference == "previous" or train.use_lora or n == 1:
            return None
        return train.model  # full fine-tuning from round 2 on: a frozen copy of the starting model

    def trained(self, n: int) -> bool:
        return Path(self.policy(n)).exists()

    def sampling(self) -> Sampling:
        c = self.config
        return Sampling(c.max_new_tokens, c.temperature, c.top_p)


def generate_stage(loop: Loop, n: int) -> None:
    """k answers per training prompt (a seeded subset of prompts_per_round) from the policy of round n-1."""
    config = loop.config
    prompts = loop.train_prompts
    if config.prompts_per_round is not None and config.prompts_per_round < len(prompts):
        keep = sorted(
            random.Random(config.train.seed + n).sample(range(len(prompts)), config.prompts_per_round)
        )
        prompts = [prompts[i] for i in keep]
    log = loop.round_dir(n) / "server-generation.log"
    answers = generate(loop, n - 1, prompts, config.samples_per_prompt, config.train.seed + n, log)

    def write() -> None:
        records = [
            {"prompt": p, "answers": [a.text for a in group], "num_tokens": [a.num_tokens for a in group]}
            for p, group in zip(prompts, answers)
        ]
        write_jsonl(loop.round_dir(n) / "generations.jsonl", records)

    loop.ranks.on_main(write)


def generate(
    loop: Loop, n: int, prompts: list[Text], k: int, seed: int, log: Path, model=None
) -> list[list[Answer]] | None:
    """k answers per prompt from the policy after round n (`model`: it, already loaded), on rank 0 (None on
    the other ranks when a server generates).

    transformers: batches of generation_batch_size prompts, each seeded on its own (BATCH_SEED_STRIDE) and
    dealt out over the ranks, each rank generating with a whole copy of the policy (under fsdp2 too:
    inference needs no sharding); the answers are the same, sampled or greedy, whatever the number of
    processes. vllm and openai get every prompt at once, on rank 0.
    """
    config, sampling = loop.config, loop.sampling()
    if config.backend != "transformers":

        def on_server() -> list[list[Answer]]:
            with open_backend(loop, n, log) as backend:
                return backend.generate(prompts, k, sampling, seed)

        return loop.ranks.on_main(on_server)
    size = config.generation_batch_size
    batches = [prompts[start : start + size] for start in range(0, len(prompts), size)]
    with open_backend(loop, n, log, model) as backend:
        groups = loop.ranks.gather(
            range(len(batches)),
            lambda b: backend.generate(batches[b], k, sampling, seed + b * BATCH_SEED_STRIDE),
        )
    return [answers for group in groups for answers in group]


def judge_stage(loop: Loop, n: int) -> None:
    """Score every answer; samples.jsonl holds the generations with their scores (null: the judge failed).

    Run again on a resume before pairing (see `unjudged`), it judges only the prompts with a failed score,
    all their answers (a pairwise judge scores each against the others), and keeps every other score.
    """
    directory = loop.round_dir(n)
    samples = directory / "samples.jsonl"
    records = read_jsonl(samples if samples.exists() else directory / "generations.jsonl")
    todo = [r for r in records if None in r.get("scores", [None])]
    prompts = [r["prompt"] for r in todo for _ in r["answers"]]
    scores = iter(loop.judge.score(prompts, [a for r in todo for a in r["answers"]]))
    for record in todo:
        record["scores"] = [next(scores) for _ in record["answers"]]
    write_jsonl(samples, records)


def unjudged(directory: Path) -> bool:
    """Whether a round's judging is to run: never run, or run with failures and the round not yet paired.
    A judge server that was down when the round stopped for too few pairs is asked again on --resume."""
    samples = directory / "samples.jsonl"
    if not samples.exists():
        return True
    return not (directory / "pairs.jsonl").exists() and any(None in r["scores"] for r in read_jsonl(samples))


def pair_stage(loop: Loop, n: int) -> None:
    """Pairs by the configured rule, hard-negative mining when asked; report.json says what was dropped and why.

    Fewer than min_pairs pairs stop the run (report.json is written, pairs.jsonl is not).
    """
    config, directory = loop.config, loop.round_dir(n)
    samples = read_jsonl(directory / "samples.jsonl")
    rng = random.Random(config.train.seed + n)
    dropped = {DROP_JUDGE: 0, DROP_GAP: 0, DROP_MINING: 0}
    pairs = []
    for record in samples:
        picked = pick_pair(record["scores"], config.pairing, config.min_score_gap, rng)
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        chosen, rejected = picked
        row = preference_row(
            record["prompt"], record["answers"][chosen], record["answers"][rejected], loop.tokenizer
        )
        pairs.append(
            {**row, "score_chosen": record["scores"][chosen], "score_rejected": record["scores"][rejected]}
        )
    mining_skipped = False
    if config.hard_negative_fraction is not None and pairs:
        margins = pair_margins(loop, n, pairs)
        mining_skipped = margins is None
        if margins is not None:
            keep = hard_negatives(margins, config.hard_negative_fraction)
            dropped[DROP_MINING] = len(pairs) - len(keep)
            pairs = [{**pairs[i], "margin": margins[i].item()} for i in keep]
    report = {
        "round": n,
        "prompts": len(samples),
        "answers": sum(len(r["answers"]) for r in samples),
        "judge_failed_answers": sum(s is None for r in samples for s in r["scores"]),
        "pairs": len(pairs),
        "dropped": dropped,
    }
    if mining_skipped:
        report["mining_skipped"] = MINING_SKIPPED
    write_atomic(directory / "report.json", json.dumps(report, indent=2))
    loop.console.print(
        f"round {n}: {len(pairs)} of {len(samples)} prompts gave a pair; dropped "
        + ", ".join(f"{count} {reason}" for reason, count in dropped.items())
        + f"; {report['judge_failed_answers']} answers the judge failed on"
        + (f"; hard-negative mining skipped: {MINING_SKIPPED}" if mining_skipped else "")
    )
    if len(pairs) < config.min_pairs:
        raise DpokitError(
            f"round {n}: {len(pairs)} pairs, fewer than min_pairs={config.min_pairs} "
            f"(dropped: {', '.join(f'{c} {r}' for r, c in dropped.items())}); see {directory / 'report.json'}"
            + ("; --resume asks the judge again where it failed" if report["judge_failed_answers"] else "")
            + (f"; to train on these: --resume min_pairs={len(pairs)}" if pairs else "")
        )
    write_jsonl(directory / "pairs.jsonl", pairs)


def pair_margins(loop: Loop, n: int, pairs: list[dict]):
    """Implicit-reward margins (N,) of the pairs under the policy of round n-1, against the reference that
    policy was trained with: beta * log(pi / ref) is the reward it learned (Rafailov et al. 2023, eq. 5).

    That reference is the starting model (or train.reference_model) under `reference: initial`, and round
    n-2's policy under `previous` (round n's own reference, the policy itself, would make every margin 0).
    None when the policy is its own reference (round 1 without a train.reference_model): no margin to rank.
    """
    config = loop.config
    reference_name = loop.policy(n - 2) if config.reference == "previous" and n >= 2 else loop.reference(n)
    if reference_name is None and adapter_base(loop.policy(n - 1)) is None:
        return None
    rows = [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
    batch = config.generation_batch_size
    policy = load_frozen(loop.policy(n - 1), config.train)
    # None: the policy's base with its LoRA adapters disabled (reference_context).
    reference = None if reference_name is None else load_frozen(reference_name, config.train)
    policy_logps = row_logps(policy, loop.tokenizer, rows, batch)
    with reference_context(policy, reference) as model:
        reference_logps = row_logps(model, loop.tokenizer, rows, batch)
    return implicit_margins(policy_logps, reference_logps, loop.config.train.resolved_beta)


def train_stage(loop: Loop, n: int) -> None:
    """Train round n on its pairs through `dpokit train`'s own function, from the policy of round n-1.

    With LoRA that policy is round n-1's adapter directory, which `train` trains on, its base (adapters
    disabled) being the reference; with `merges`, the adapter is merged into round-n/policy afterwards.
    """
    from dpokit.train.loop import train

    config, directory = loop.config, loop.round_dir(n)
    start = loop.policy(n - 1)
    run_config = config.train.model_copy(
        update={"model": start, "output_dir": str(directory / "train"), "reference_model": loop.reference(n)}
    )
    final = directory / "train" / "final"
    if not final.exists():
        rows = [
            {key: pair[key] for key in ("prompt", "chosen", "rejected")}
            for pair in read_jsonl(directory / "pairs.jsonl")
        ]
        # Every rank trains, on the same rows; the process group joined at the start outlives each round.
        train(run_config, resume=True, console=loop.console, train_rows=rows, distributed=loop.distributed)
        loop.ranks.barrier()  # rank 0 writes final/ last: the others load it next
    if loop.merges:
        loop.ranks.on_main(partial(merge_policy, loop, n))


def merge_policy(loop: Loop, n: int) -> None:
    """Round n's adapter merged into round n's starting policy: round-n/policy."""
    train = loop.config.train
    start = load_model(loop.policy(n - 1), trust_remote_code=train.trust_remote_code)
    merged = load_adapter(str(loop.round_dir(n) / "train" / "final"), start)
    save_final(merged.merge_and_unload(), loop.tokenizer, loop.round_dir(n) / "policy")


def evaluate_stage(loop: Loop, n: int) -> dict[str, Any] | None:
    """Held-out evaluation of the policy after round n; writes round-n/eval_samples.jsonl, returns the record
    (on rank 0; None on the other ranks, which only generate)."""
    config = loop.config
    # transformers generates with the policy loaded here for the KL; another backend loads its own copy.
    policy = load_frozen(loop.policy(n), config.train) if config.backend == "transformers" else None
    log = loop.round_dir(n) / "server-evaluation.log"
    groups = generate(loop, n, loop.eval_prompts, 1, config.train.seed, log, policy)
    return loop.ranks.on_main(lambda: judge_held_out_answers(loop, n, [group[0] for group in groups], policy))


def judge_held_out_answers(loop: Loop, n: int, answers: list[Answer], policy) -> dict[str, Any]:
    """Judge score, win rate and KL of round n's held-out answers; writes eval_samples.jsonl."""
    config, directory, prompts = loop.config, loop.round_dir(n), loop.eval_prompts
    if policy is None:
        policy = load_frozen(loop.policy(n), config.train)
    texts = [a.text for a in answers]
    reference = read_jsonl(loop.round_dir(0) / "eval_samples.jsonl") if n > 0 else None
    scores, outcomes = judge_held_out(loop.judge, prompts, texts, reference)
    # KL to the starting model: a LoRA policy's own base with adapters disabled (None), else a loaded copy.
    initial = policy if n == 0 else None if is_peft(policy) else load_frozen(config.train.model, config.train)
    kl = kl_estimate(policy, initial, loop.tokenizer, prompts, texts, config.generation_batch_size)
    records = [
        {"prompt": p, "text": a.text, "num_tokens": a.num_tokens, "score": s, "vs_reference": o}
        for p, a, s, o in zip(prompts, answers, scores or [None] * len(answers), outcomes)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "eval_samples.jsonl", records)
    record = summarize(n, scores, [a.num_tokens for a in answers], kl, outcomes)
    if n > 0:
        report = json.loads((directory / "report.json").read_text())
        record.update(pairs=report["pairs"], prompts=report["prompts"], dropped=report["dropped"])
    return record


# Settings a resume may change: they decide whether the run goes on, not what a finished stage made.
# rounds: running more rounds is what resuming a finished run is for; min_pairs: a round that stopped for
# too few pairs continues with the pairs it has when the user accepts fewer.
RESUMABLE_CHANGES = ("rounds", "min_pairs")


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between a run's saved config and this one, other than
    RESUMABLE_CHANGES."""
    changed = []
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            changed += config_changes(old, value, f"{prefix}{key}.")
        elif old != value and not (prefix == "" and key in RESUMABLE_CHANGES):
            changed.append(prefix + key)
    return changed


def iterate(
    config: IterateConfig,
    resume: bool = False,
    console: Console | None = None,
    distributed: str | None = None,
) -> Path:
    """Run (or, with resume, continue) the on-policy loop; returns the run directory.

    distributed: the engine every round trains with, as `dpokit train --distributed` takes it (a preset or
    an accelerate config file); None: what the launcher set. Under a launcher call this on every rank.
    """
    console = console or Console(stderr=True)
    run_dir = Path(config.output_dir)
    log = run_dir / "rounds.jsonl"
    resolve_engine(distributed)  # a bad --distributed fails now, on every rank alike
    ranks = start_ranks()
    if not ranks.main:
        console = Console(quiet=True)
    ranks.on_main(partial(check_run_dir, config, resume))
    # Bad prompt files, backends and judges fail now, not in round 1 (prompts and backend on every rank alike).
    prompts, eval_prompts = read_prompts(config.prompts), read_prompts(config.eval_prompts)
    check_backend(config)
    judge = ranks.on_main(partial(open_run, config))
    loop = Loop(config, run_dir, console, judge, prompts, eval_prompts, ranks, distributed)
    records = read_jsonl(log) if log.exists() else []
    for n in range(config.rounds + 1):
        if n > 0:
            directory = loop.round_dir(n)
            directory.mkdir(exist_ok=True)
            if not (directory / "generations.jsonl").exists():
                generate_stage(loop, n)
            if unjudged(directory):
                ranks.on_main(partial(judge_stage, loop, n))
            if not (directory / "pairs.jsonl").exists():
                ranks.on_main(partial(pair_stage, loop, n))
            if not loop.trained(n):
                train_stage(loop, n)
        if n >= len(records):
            records.append(evaluate_stage(loop, n))  # None on ranks other than 0
            if ranks.main:
                write_jsonl(log, records)
                console.print(
                    f"round {n}: "
                    + ", ".join(f"{k}={_fmt(v)}" for k, v in records[-1].items() if k != "round")
                )
    if ranks.main:
        console.print(rounds_table(records))
    stop_ranks(ranks)
    return run_dir


def check_run_dir(config: IterateConfig, resume: bool) -> None:
    """Refuse to start over a run, or to resume one whose settings changed."""
    run_dir = Path(config.output_dir)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise DpokitError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another output_dir"
        )
    if resume and (run_dir / "config.yaml").exists():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        current = yaml.safe_load(yaml.safe_dump(config.model_dump(), sort_keys=False))
        changed = config_changes(saved, current)
        if changed:
            raise DpokitError(
                f"{run_dir / 'config.yaml'}: cannot resume, {', '.join(changed)} changed since the run started "
                "(finished rounds were made with the old values); restore them or use another output_dir"
            )


def open_run(config: IterateConfig) -> Judge:
    """The judge (whose errors surface now, not in round 1); writes the run's config.yaml."""
    judge = build_judge(config.judge, inference_device())
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))
    return judge


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rounds_table(records: list[dict[str, Any]]) -> Table:
    """The console table of rounds.jsonl."""
    columns = ("round", "reward_mean", "reward_std", "kl", "length_mean", "win_rate_vs_reference", "pairs")
    table = Table(title="on-policy rounds")
    for column in columns:
        table.add_column(column, justify="right")
    for record in records:
        table.add_row(*(_fmt(record.get(column, "")) for column in columns))
    return table
