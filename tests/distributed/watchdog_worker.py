"""Run by test_watchdog_ranks.py under torchrun: DDP training (4 steps, held-out metrics and samples every
2) whose watchdog must stop at step 2 in every process, on what one process computes: its share of the
held-out batches (`eval`: the main process's made NaN from step 2) or the samples, which the main process
alone generates (`samples`: generation replaced by fixed answers, healthy from the reference, looping from
the policy). Writes OUT/rank-R.json: the finding codes this process
stopped on and the step, or null if it trained to the end.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/watchdog_worker.py \
    eval|samples OUT MODEL PAIRS
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from launching import exit_worker

from dpokit.config import RunConfig
from dpokit.diagnostics.watchdog import WatchdogStop
from dpokit.distributed import make_accelerator
from dpokit.pair_stats import PairStats
from dpokit.train import hooks as hooks_module
from dpokit.train import loop as loop_module

evaluate_module = importlib.import_module("dpokit.evaluate")  # `dpokit.evaluate` names the API function

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


def nan_from_the_second_evaluation() -> type[PairStats]:
    """PairStats for the held-out evaluation whose losses are NaN from the second evaluation (step 2)."""
    made = []

    class Stats(PairStats):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

        def add(self, losses, *rest) -> None:
            super().add(losses * float("nan") if len(made) > 1 else losses, *rest)

    return Stats


def main(what: str, out: str, model: str, pairs: str) -> None:
    accelerator = make_accelerator()  # the process group train() then joins
    rank = accelerator.process_index
    prompts = Path(out) / "prompts.txt"
    if rank == 0:
        prompts.write_text("Review a film.\nName a colour.\n")
    accelerator.wait_for_everyone()
    if what == "samples":
        hooks_module.generate_samples = fixed_samples  # under DDP the main process alone calls it
    elif rank == 0:  # the main process's share of the held-out batches alone turns NaN
        evaluate_module.PairStats = nan_from_the_second_evaluation()
    config = RunConfig(
        model=model,
        train_data=pairs,
        eval_data=pairs,
        sample_prompts=str(prompts),
        sample_every=2,
        eval_every=2,
        stop_on_critical=True,
        use_lora=False,
        learning_rate=1e-4,
        allow_risky_hyperparameters=True,
        effective_batch_size=8,
        micro_batch_size=2,
        num_epochs=2,
        save_every=0,
        report_to=[],
        output_dir=f"{out}/run",
        cache_dir=f"{out}/cache",
    )
    result = None
    try:
        loop_module.train(config, distributed="ddp")
    except WatchdogStop as stop:
        result = {"codes": [f.code for f in stop.findings], "step": stop.findings[0].step}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    exit_worker()


if __name__ == "__main__":
    main(*sys.argv[1:])
