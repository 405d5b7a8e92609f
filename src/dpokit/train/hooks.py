"""What the loop does besides optimising: watchdog rules, periodic samples with a judge, the end summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from dpokit.atomic import write_atomic
from dpokit.config import RunConfig
from dpokit.data.prepare import read_prompts
from dpokit.diagnostics.findings import print_findings
from dpokit.diagnostics.samples import generate_samples
from dpokit.diagnostics.watchdog import Watchdog
from dpokit.distributed import from_main
from dpokit.judges import vader_score
from dpokit.models.loading import is_peft

SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class RunHooks:
    """Called by the loop after each metrics record and at sampling points."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        console: Console,
        accelerator: Accelerator,
        sharded: bool = False,
    ) -> None:
        self.config, self.run_dir, self.tokenizer, self.console = config, run_dir, tokenizer, console
        self.main = accelerator.is_main_process
        self.sharded = sharded  # FSDP2: every process generates with the main one (greedy: the same text)
        self.accelerator = accelerator
        self.watchdog = Watchdog(config.resolved(), stop_on_critical=config.stop_on_critical)
        self.prompts = read_prompts(config.sample_prompts) if config.sample_prompts else []
        self.evals: list[dict[str, Any]] = []
        self.judge_means: dict[int, float] = {}

    def replay(self, records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
        """Take in what a resumed run had logged before its checkpoint, silently: the watchdog sees the whole
        history (its findings then were printed then), and the summary compares against the first eval."""
        stop_on_critical, self.watchdog.stop_on_critical = self.watchdog.stop_on_critical, False
        for record in records:
            if record["split"] == "eval":
                self.evals.append(record)
            self.watchdog.update(record)
        if samples:
            self.watchdog.update_samples(samples)
        for step in sorted({s["step"] for s in samples if "judge" in s}):
            scores = [s["judge"] for s in samples if s["step"] == step and "judge" in s]
            self.judge_means[step] = sum(scores) / len(scores)
        self.watchdog.stop_on_critical = stop_on_critical

    def on_record(self, record: dict[str, Any]) -> None:
        """Run the watchdog on a new metrics record; it raises WatchdogStop on a critical finding if asked to."""
        if record["split"] == "eval":
            self.evals.append(record)
        # Out-of-range hyperparameters were already warned about when the config was loaded.
        findings = [f for f in self.watchdog.update(record) if not f.code.endswith("_out_of_range")]
        if findings and self.main:
            print_findings(findings, self.console)

    def on_samples(self, model: torch.nn.Module, step: int, before_training: bool = False) -> None:
        """Generate answers to the fixed prompts; before training they are the reference's (policy == reference).

        Greedy decoding: policy and reference answers differ only by what training changed. A PEFT policy
        scores its answers' reference perplexity with its adapters disabled.
        """
        if not self.prompts:
            return
        records: list[dict[str, Any]] = []
        if self.main or self.sharded:
            records = generate_samples(
                model,
                self.tokenizer,
                self.prompts,
                self.config.sample_max_new_tokens,
                step,
                "reference" if before_training else "policy",
                reference_model=model if is_peft(model) else None,
            )
            if self.config.judge == "vader":
                for record, score in zip(records, vader_score([r["text"] for r in records])):
                    record["judge"] = score
        if not self.sharded:  # DDP: the main process alone generates; every process's watchdog reads them
            records = from_main(self.accelerator, records)
        if self.config.judge == "vader":
            self.judge_means[step] = sum(r["judge"] for r in records) / len(records)
        if self.main:
            with (self.run_dir / "samples.jsonl").open("a", encoding="utf-8") as file:
                for record in records:
                    file.write(json.dumps(record) + "\n")
        findings = self.watchdog.update_samples(records)
        if findings and self.main:
            print_findings(findings, self.console)

    def summary(self) -> None:
        """Before/after table of held-out preference metrics and the judge's mean score of fresh samples."""
        if not self.main or (len(self.evals) < 2 and len(self.judge_means) < 2):
            return
        table = Table(title=f"dpokit run {self.run_dir}")
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        if len(self.evals) >= 2:
            first, last = self.evals[0], self.evals[-1]
            for key in SUMMARY_KEYS:
                table.add_row(f"held-out {key}", f"{first[key]:.4f}", f"{last[key]:.4f}")
        steps = sorted(self.judge_means)
        if len(steps) >= 2:
            before, after = self.judge_means[steps[0]], self.judge_means[steps[-1]]
            table.add_row("judge mean of samples", f"{before:+.4f}", f"{after:+.4f}")
        self.console.print(table)
        summary = {
            "eval_before": self.evals[0] if self.evals else None,
            "eval_after": self.evals[-1] if self.evals else None,
            "judge_before": self.judge_means[steps[0]] if steps else None,
            "judge_after": self.judge_means[steps[-1]] if steps else None,
        }
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
