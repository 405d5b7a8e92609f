"""Run by test_watchdog_ranks.py under torchrun: the run's hooks as the DDP training loop holds them, with
sample generation replaced by fixed answers (healthy from the reference, looping from the policy), so the
gibberish rule's stop is certain; writes OUT/rank-R.json: whether this process's watchdog stopped, and on
which samples.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/watchdog_worker.py OUT MODEL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from launching import exit_worker
from rich.console import Console
from transformers import AutoTokenizer

from dpokit.config import RunConfig
from dpokit.diagnostics.watchdog import WatchdogStop
from dpokit.distributed import make_accelerator
from dpokit.train import hooks as hooks_module
from dpokit.train.hooks import RunHooks

HEALTHY = "a short and fresh reply to the prompt"
LOOPING = "the the the the the the the the the the the the"


def fixed_samples(model, tokenizer, prompts, max_new_tokens, step, source, reference_model=None):
    text, repetition = (HEALTHY, 0.0) if source == "reference" else (LOOPING, 0.9)  # 3-grams seen before
    return [
        {
            "step": step,
            "source": source,
            "prompt": p,
            "text": text,
            "num_tokens": 12,
            "repetition": repetition,
        }
        for p in prompts
    ]


def main(out: str, model: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    prompts = Path(out) / "prompts.txt"
    if rank == 0:
        prompts.write_text("Review a film.\nName a colour.\n")
    accelerator.wait_for_everyone()
    config = RunConfig(
        model=model, sample_prompts=str(prompts), stop_on_critical=True, output_dir=out, report_to=[]
    )
    hooks_module.generate_samples = fixed_samples  # the main process alone calls it under DDP
    hooks = RunHooks(config, Path(out), AutoTokenizer.from_pretrained(model), Console(), accelerator)
    hooks.on_samples(torch.nn.Linear(1, 1), 0, before_training=True)
    result = {"stopped": None, "judge_means": None}
    try:
        hooks.on_samples(torch.nn.Linear(1, 1), 2)
    except WatchdogStop as stop:
        result["stopped"] = [finding.code for finding in stop.findings]
    result["judge_means"] = hooks.judge_means
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    exit_worker()


if __name__ == "__main__":
    main(*sys.argv[1:])
