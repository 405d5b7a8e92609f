"""dpokit vs TRL 1.16 DPOTrainer: step time, wall time, trained tokens/s, peak memory, MFU and loss curves.

Each system trains the same model on the same pairs (exactly one epoch of steps * batch pairs, so every system
sees the same pairs) with the same effective batch, max length, AdamW, learning rate and cosine schedule without
warmup, each in its own subprocess:

    dpokit          dpokit's own code path: setup_run -> reference_pass -> setup_optimizer -> train_step per step
                    (dpokit.train), as `dpokit train` runs it, without its eval, samples, trackers and checkpoints
    trl             TRL DPOTrainer, its defaults (reference forward at every step, gradient checkpointing on;
                    bf16 autocast over float32 weights on CUDA, float32 on CPU)
    trl_precompute  the same with precompute_ref_log_probs=True

Whole-job wall time runs from before loading the models to after the last optimizer step (imports left out);
the same without the time spent loading model weights is what tokens/s divides by. Tokens are counted the same
way for all: 2*prompt + chosen + rejected non-padding tokens per pair (TokenizedPair.num_tokens).

    python benchmarks/vs_trl.py --data benchmarks/data/longtail.jsonl --model tiny --steps 4 --json /tmp/tiny.json
    python benchmarks/vs_trl.py --model smollm2 --steps 2 --batch 8 --json /tmp/smollm2.json
    python benchmarks/vs_trl.py --device cuda --model 1b --precision bf16-mixed --steps 16 --batch 32 \\
        --micro-batch 8 --max-length 1024 --systems dpokit,trl,trl_no_checkpointing --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SYSTEMS = ("dpokit", "trl", "trl_precompute")
# TRL's settings per system: its defaults but for the reference pass, and a run without its default gradient
# checkpointing, to show how much of the gap that accounts for (not run unless named in --systems).
TRL_SETTINGS = {
    "trl": {},
    "trl_precompute": {"precompute_ref_log_probs": True},
    "trl_no_checkpointing": {"gradient_checkpointing": False},
}
DEFAULT_DATA = Path(__file__).parent / "data" / "longtail.jsonl"
# Random Llamas with SmolLM2's 49,152-token vocabulary and an untied output layer, fully trained. tiny: a small
# body; 1b: TinyLlama-1.1B's shape, built from a config (nothing downloaded).
SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4},
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
    },
}
SHAPES["tiny"] |= {"num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False}
SHAPES["1b"] |= {"num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
}  # smollm2, both systems
BETA = 0.1


@dataclass
class Spec:
    """What every child process needs; written to JSON by the parent."""

    data: str  # the benchmark's pairs: exactly steps * batch rows that survive tokenization
    model_dir: str
    lora: bool
    device: str  # cpu or cuda
    precision: str | None  # dpokit's RunConfig.precision; None: its default
    steps: int
    batch: int
    micro_batch: int
    max_length: int
    learning_rate: float
    seed: int
    token_budget: int
    chunk_size: int
    threads: int | None
    out: str


SPEC_FROM_ARGS = (
    "device",
    "precision",
    "steps",
    "batch",
    "micro_batch",
    "max_length",
    "seed",
    "token_budget",
    "chunk_size",
    "threads",
)


def clock(device: str) -> float:
    """perf_counter once the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory(device: str) -> dict[str, float]:
    """CPU: the process's peak RSS (Python, torch and libraries included). CUDA: torch's peak allocated
    memory and the device's total."""
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
            "device_memory_mb": total / 2**20,
        }
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def matmul_flops_per_s(device: str, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` (n x n) matmuls in `dtype` into a preallocated output, with this
    process's threads and TF32 setting: the roof MFU is measured against (the best the device did, not its
    average). n is 2048 on CPU, 8192 on CUDA (large enough to saturate the tensor cores)."""
    n = 8192 if device == "cuda" else 2048
    a, b, out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    torch.mm(a, b, out=out)  # warm-up: kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = clock(device)
        torch.mm(a, b, out=out)
        best = min(best, clock(device) - start)
    return 2 * n**3 / best


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls per token: all but the input embedding; the output layer counts
    once even when tied to the embedding, since its matmul runs either way."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    total = sum(p.numel() for p in model.parameters()) - embedding.weight.numel()
    return total + head.weight.numel() if head.weight is embedding.weight else total


def run_dpokit(spec: Spec, checkpointing: bool, compile: bool = False) -> dict:
    """dpokit's training path as dpokit.train.loop.train composes it: setup_run, reference_pass (a fresh cache,
    so the reference log-probs are computed), setup_optimizer, then train_step for each step; no eval, samples,
    trackers or checkpoints (which TRL's side has no counterpart for here)."""
    from rich.console import Console

    from dpokit.config import RunConfig
    from dpokit.train import run as run_module
    from dpokit.train.reference_pass import reference_pass
    from dpokit.train.run import setup_optimizer, setup_run
    from dpokit.train.step import train_step

    # Time spent reading model weights (policy and reference), to report the job without it: setup_run's own
    # load_model, wrapped in a timer.
    loading = []
    load_model = run_module.load_model

    def timed_load_model(*args: object, **kwargs: object) -> torch.nn.Module:
        start = clock(spec.device)
        model = load_model(*args, **kwargs)
        loading.append(clock(spec.device) - start)
        return model

    run_module.load_model = timed_load_model
    precision = {"precision": spec.precision} if spec.precision else {}
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-run-") as tmp:
        config = RunConfig(
            model=spec.model_dir,
            train_data=spec.data,
            eval_data=None,
            sample_prompts=None,
            judge="none",
            report_to=[],
            save_every=0,
            use_lora=spec.lora,
            lora_r=LORA["r"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=LORA["lora_dropout"],
            lora_target_modules=LORA["target_modules"],
            learning_rate=spec.learning_rate,
            beta=BETA,
            effective_batch_size=spec.batch,
            micro_batch_size=spec.micro_batch,
            max_steps=spec.steps,
            warmup_ratio=0.0,
            max_length=spec.max_length,
            token_budget=spec.token_budget,
            logps_chunk_size=spec.chunk_size,
            gradient_checkpointing=checkpointing,
            compile=compile,
            cache_dir=str(Path(tmp) / "cache"),
            output_dir=str(Path(tmp) / "run"),
            seed=spec.seed,
            **precision,
        )
        start = clock(spec.device)
        run = setup_run(config, Console(stderr=True))
        setup_done = clock(spec.device)
        reference_pass(run)
        reference_done = clock(spec.device)
        setup_optimizer(run)
        run.policy.train()
        step_s, losses = [], []
        for step in range(run.total_steps):
            step_start = clock(spec.device)
            record = train_step(run, step)
            step_s.append(clock(spec.device) - step_start)
            losses.append(record["loss"])
        end = clock(spec.device)

        return {
            "wall_s": end - start,
            "wall_no_load_s": end - start - sum(loading),
            "load_s": sum(loading),
            "setup_s": setup_done - start - sum(loading),  # tokenizer, tokenization, models to the device
            "reference_s": reference_done - setup_done,
            "step_s": step_s,
            "median_step_s": statistics.median(step_s),
            "losses": losses,
            "pairs": len(run.data.train),
            "threads": torch.get_num_threads(),
            **peak_memory(spec.device),
            **roof(spec.device, run.precision.compute_dtype),
        }


def roof(device: str, dtype: torch.dtype) -> dict:
    """The measured matmul peak in the dtype the run's matmuls ran in, and what it was measured with."""
    tf32 = device == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "matmul_flops_per_s": matmul_flops_per_s(device, dtype),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tf32": tf32,
    }


def executed_tokens(pairs: list) -> dict[str, int]:
    """Tokens dpokit actually runs: through the body (prompt once, answers but their last token) and through
    the output layer (answer tokens only)."""
    body = sum(
        len(p.prompt_ids) + max(len(p.chosen_ids) - 1, 0) + max(len(p.rejected_ids) - 1, 0) for p in pairs
    )
    return {"body": body, "head": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)}


def run_trl(spec: Spec, settings: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        """Wall time of each optimizer step: from the end of the previous one (or the start of training)."""

        def __init__(self) -> None:
            self.last = 0.0
            self.step_s: list[float] = []

        def on_train_begin(self, *args: object, **kwargs: object) -> None:
            self.last = clock(spec.device)

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            now = clock(spec.device)
            self.step_s.append(now - self.last)
            self.last = now

    torch.manual_seed(spec.seed)
    start = clock(spec.device)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    loaded = clock(spec.device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    rows = [json.loads(line) for line in Path(spec.data).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    cuda = spec.device == "cuda"
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to="none",
        use_cpu=not cuda,
        save_strategy="no",
        max_steps=spec.steps,
        per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=spec.batch // spec.micro_batch,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",  # dpokit's schedule, so that the loss curves compare
        warmup_steps=0,
        beta=BETA,
        max_length=spec.max_length,
        seed=spec.seed,
        logging_steps=1,
        disable_tqdm=True,
        bf16=cuda,  # TRL's GPU default (autocast over float32 weights); float32 on CPU, like dpokit there
        **settings,
    )
    peft_config = LoraConfig(**LORA, task_type="CAUSAL_LM") if spec.lora else None
    timer = StepTimes()
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    init_done = clock(spec.device)
    trainer.train()
    end = clock(spec.device)
    return {
        "wall_s": end - start,
        "wall_no_load_s": end - loaded,
        "load_s": loaded - start,
        "init_s": init_done - loaded,
        "step_s": timer.step_s,
        "median_step_s": statistics.median(timer.step_s),
        "losses": [record["loss"] for record in trainer.state.log_history if "loss" in record],
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16,
        **peak_memory(spec.device),
        **roof(spec.device, torch.bfloat16 if args.bf16 else torch.float32),
    }


def child(system: str, spec_path: str) -> None:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if system in TRL_SETTINGS:
        result = run_trl(spec, TRL_SETTINGS[system])
    else:
        result = run_dpokit(
            spec, checkpointing=system == "dpokit_checkpointing", compile=system == "dpokit_compile"
        )
    Path(spec.out).write_text(json.dumps(result))


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, list, dict[str, int]]:
    """The model directory, the first steps*batch rows of --data that survive tokenization as a file, those
    pairs (after truncation, as every system counts them), and the model's matmul and output-layer parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from dpokit.data.reading import load_rows
    from dpokit.data.tokenize import tokenize_rows
    from dpokit.models.loading import load_tokenizer
    from dpokit.models.smollm2 import smollm2_dir

    source = smollm2_dir()
    if args.model == "smollm2":
        model_dir = source
    else:
        tokenizer = load_tokenizer(str(source))
        model_dir = workdir / args.model
        torch.manual_seed(args.seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SHAPES[args.model])).save_pretrained(
            model_dir
        )
        tokenizer.save_pretrained(model_dir)
    with torch.device("meta"):  # the shapes only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    params = {
        "matmul_params": matmul_params(model),
        "head_params": model.get_output_embeddings().weight.numel(),
    }
    tokenizer = load_tokenizer(str(model_dir))
    rows, _ = load_rows(args.data)
    wanted = args.steps * args.batch
    tokenized = tokenize_rows(tokenizer, rows, args.max_length).pairs[:wanted]
    if len(tokenized) < wanted:
        raise SystemExit(f"{args.data}: {len(tokenized)} usable rows, {wanted} needed for {args.steps} steps")
    records = Path(args.data).read_text().split("\n")  # TokenizedPair.line: the 1-based line of a JSONL row
    data = workdir / "pairs.jsonl"
    data.write_text("".join(records[pair.line - 1] + "\n" for pair in tokenized))
    return model_dir, data, tokenized, params


def summarise(results: dict[str, dict], pairs: list, params: dict[str, int], lora: bool) -> dict:
    """Tokens/s, MFU of every system, ratios dpokit / each TRL system; formulas in benchmarks/README.md."""
    tokens = sum(p.num_tokens for p in pairs)
    train_factor = 4 if lora else 6  # LoRA: forward + input gradients; full: + weight gradients
    n, head = params["matmul_params"], params["head_params"]
    useful = (train_factor + 2) * n * tokens  # + one forward for the reference pass
    for result in results.values():
        result["tokens_per_s"] = tokens / result["wall_no_load_s"]
        result["tokens_per_s_whole_job"] = tokens / result["wall_s"]
        result["mfu"] = useful / (result["wall_no_load_s"] * result["matmul_flops_per_s"])
    summary: dict = {"model_flops": useful, **params}
    for variant in set(results) - set(TRL_SETTINGS):
        prefix = "" if variant == "dpokit" else f"{variant}_"
        for system in set(results) & set(TRL_SETTINGS):
            name = "trl_default" if system == "trl" else system
            ours, theirs = results[variant], results[system]
            summary[f"{prefix}throughput_ratio_vs_{name}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            summary[f"{prefix}median_step_speedup_vs_{name}"] = (
                theirs["median_step_s"] / ours["median_step_s"]
            )
            summary[f"{prefix}whole_job_speedup_vs_{name}"] = theirs["wall_s"] / ours["wall_s"]
            ratio = ours["peak_memory_mb"] / theirs["peak_memory_mb"]
            summary[f"{prefix}peak_memory_ratio_vs_{name}"] = ratio
    ours = results.get("dpokit")
    if ours is not None:
        # What dpokit actually runs: the body on each prompt once, the output layer on answer tokens only, and
        # there one more forward, recomputed in backward by the chunked log-probs.
        executed = executed_tokens(pairs)
        flops = (train_factor + 2) * (n - head) * executed["body"] + (train_factor + 4) * head * executed[
            "head"
        ]
        summary.update(
            dpokit_mfu=ours["mfu"],
            dpokit_executed_flops=flops,
            dpokit_hardware_flops_utilisation=flops / (ours["wall_no_load_s"] * ours["matmul_flops_per_s"]),
        )
    return summary


def print_report(results: dict[str, dict]) -> None:
    """One line per system, then every system's per-step losses."""
    header = f"{'system':<22} {'median step s':>13} {'wall s':>8} {'no load s':>9} {'tokens/s':>9}"
    print(header + f" {'peak MB':>9} {'MFU':>6}  roof")
    for system, r in results.items():
        roof = f"{r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s {r['matmul_dtype']}"
        print(
            f"{system:<22} {r['median_step_s']:>13.3f} {r['wall_s']:>8.1f} {r['wall_no_load_s']:>9.1f}"
            f" {r['tokens_per_s']:>9.1f} {r['peak_memory_mb']:>9.0f} {r['mfu']:>6.1%}  {roof}"
        )
    print("per-step losses:")
    for system, r in results.items():
        print(f"  {system:<20} " + " ".join(f"{loss:.6f}" for loss in r["losses"]))


def main() -> None:
    from dpokit.config import RunConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", choices=("tiny", "1b", "smollm2"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    precisions = typing.get_args(RunConfig.model_fields["precision"].annotation)
    parser.add_argument(
        "--precision", choices=precisions, help="dpokit's RunConfig.precision (default: auto)"
    )
    parser.add_argument(
        "--lora", action="store_true", help="LoRA r16 on every system (always on for smollm2)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step (effective batch)")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per forward (TRL's default 8)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, help="default 1e-6 (tiny, 1b), 2e-5 (smollm2 LoRA)")
    parser.add_argument("--token-budget", type=int, default=2048, help="dpokit: tokens per packed row")
    parser.add_argument("--chunk-size", type=int, default=1024, help="dpokit: tokens per output-layer chunk")
    parser.add_argument("--threads", type=int, help="torch threads in every child (default: torch's)")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"of dpokit, dpokit_checkpointing, dpokit_compile, {', '.join(TRL_SETTINGS)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per system; each system's fastest is kept"
    )
    parser.add_argument("--json", type=Path, help="where to write the results (required)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.spec)
    if args.json is None:
        parser.error("--json is required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    lora = args.lora or args.model == "smollm2"
    # --device cpu hides any GPU from the children, so that neither accelerate nor TRL picks it.
    env = {**os.environ, "TQDM_DISABLE": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        workdir = Path(tmp)
        model_dir, data, pairs, params = prepare(args, workdir)
        spec = Spec(
            **{name: getattr(args, name) for name in SPEC_FROM_ARGS},
            data=str(data),
            model_dir=str(model_dir),
            lora=lora,
            learning_rate=args.learning_rate or (2e-5 if lora else 1e-6),
            out=str(workdir / "result.json"),
        )
        (workdir / "spec.json").write_text(json.dumps(asdict(spec)))
        runs: dict[str, list[dict]] = {system: [] for system in args.systems.split(",")}
        for repeat in range(args.repeats):  # round-robin, so that a noisy spell hits every system alike
            for system in runs:
                print(f"running {system} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                command = [sys.executable, __file__, "--child", system, "--spec", str(workdir / "spec.json")]
                subprocess.run(command, check=True, env=env)
                runs[system].append(json.loads(Path(spec.out).read_text()))
    # Each system's fastest run: the machine's noise only ever slows a run down.
    results = {system: min(done, key=lambda run: run["wall_no_load_s"]) for system, done in runs.items()}
    for system, result in results.items():
        result["runs_wall_no_load_s"] = [run["wall_no_load_s"] for run in runs[system]]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "lora": lora}
    report |= {name: getattr(args, name) for name in SPEC_FROM_ARGS}
    report |= {"pairs": len(pairs), "tokens": sum(p.num_tokens for p in pairs), "systems": results}
    report.update(summarise(results, pairs, params, lora))
    args.json.write_text(json.dumps(report, indent=2))
    print_report(results)
    print(json.dumps({k: v for k, v in report.items() if k != "systems"}, indent=2))


if __name__ == "__main__":
    main()
