"""dpokit vs TRL 1.16 DPOTrainer: trained tokens/s, wall time, peak memory and dpokit's model-FLOPs utilisation.

Each system trains the same model on the same pairs (exactly one epoch of steps * batch pairs, so every system
sees the same pairs) with the same effective batch, max length, AdamW and learning rate, in float32, each in its
own subprocess:

    dpokit          packed rows, shared prompts, chunked log-probs; reference log-probs precomputed on the same path
    trl             TRL DPOTrainer, its defaults (reference forward at every step, gradient checkpointing on)
    trl_precompute  the same with precompute_ref_log_probs=True

Wall time runs from tokenization to the last optimizer step: it counts the reference pass of every system and
leaves out imports and loading the policy. Tokens are counted the same way for all: 2*prompt + chosen + rejected
non-padding tokens per pair (TokenizedPair.num_tokens).

    python benchmarks/vs_trl.py --data benchmarks/data/longtail.jsonl --model tiny --steps 4 --json /tmp/tiny.json
    python benchmarks/vs_trl.py --model smollm2 --steps 2 --max-length 512 --json /tmp/smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
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
# The tiny model: a small Llama body with SmolLM2's 49,152-token vocabulary and untied output layer, fully trained.
TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False}
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
    "steps",
    "batch",
    "micro_batch",
    "max_length",
    "seed",
    "token_budget",
    "chunk_size",
    "threads",
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_flops_per_s(n: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` float32 (n x n) matmuls into a preallocated output, with this process's
    threads: the roof MFU is measured against (the best the machine did, not its average)."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls per token: all but the input embedding; the output layer counts
    once even when tied to the embedding, since its matmul runs either way."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    total = sum(p.numel() for p in model.parameters()) - embedding.weight.numel()
    return total + head.weight.numel() if head.weight is embedding.weight else total


def run_dpokit(spec: Spec, checkpointing: bool) -> dict:
    """dpokit's library path in the order of dpokit.train.loop.train: tokenize, reference precompute (freed
    afterwards), micro-batched steps. The padded logps_fn of the loop is swapped for build_logps_fn's."""
    from transformers import get_linear_schedule_with_warmup

    from dpokit.data.prepare import load_pairs
    from dpokit.logprobs import compute_logps, select
    from dpokit.losses import LOSSES, LossParams
    from dpokit.models.loading import add_lora, load_model, load_tokenizer, reference_context
    from dpokit.packing import build_logps_fn
    from dpokit.train.loop import step_indices

    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model_dir)
    policy = load_model(spec.model_dir)
    if checkpointing:  # as the loop does for gradient_checkpointing: true
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.enable_input_require_grads()
    if spec.lora:
        policy = add_lora(
            policy, LORA["r"], LORA["lora_alpha"], LORA["lora_dropout"], LORA["target_modules"], False, False
        )
    setup_rss = peak_rss_mb()

    start = time.perf_counter()
    pairs, _ = load_pairs(spec.data, tokenizer, spec.max_length)
    logps_fn = build_logps_fn(tokenizer.pad_token_id, True, True, spec.chunk_size, spec.token_budget)
    reference = None if spec.lora else load_model(spec.model_dir).eval().requires_grad_(False)
    with reference_context(policy, reference) as ref:
        reference_logps = compute_logps(ref, pairs, logps_fn, 2 * spec.micro_batch, "reference")
    reference = None
    gc.collect()
    reference_done = time.perf_counter()

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(
        optimizer, 0, spec.steps
    )  # TRL's default: linear decay, no warmup
    params = LossParams(beta=BETA)
    policy.train()
    losses_per_step = []
    for step in range(spec.steps):
        indices = step_indices(len(pairs), spec.batch, step, spec.steps, spec.seed)
        total = 0.0
        for begin in range(0, spec.batch, spec.micro_batch):
            micro = indices[begin : begin + spec.micro_batch]
            out = logps_fn(policy, [pairs[i] for i in micro])
            losses, _, _ = LOSSES["sigmoid"](out, select(reference_logps, micro), params)
            (losses.sum() / spec.batch).backward()
            total += losses.detach().sum().item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses_per_step.append(total / spec.batch)
    end = time.perf_counter()
    base = policy.get_base_model() if spec.lora else policy
    return {
        "wall_s": end - start,
        "reference_s": reference_done - start,
        "steps_s": end - reference_done,
        "threads": torch.get_num_threads(),
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss_mb(),
        "losses": losses_per_step,
        "pairs": len(pairs),
        "tokens": sum(p.num_tokens for p in pairs),
        "executed_tokens": executed_tokens(pairs),
        "matmul_params": matmul_params(base),
        "head_params": base.get_output_embeddings().weight.numel(),
        "matmul_flops_per_s": matmul_flops_per_s(),
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec.data).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    setup_rss = peak_rss_mb()
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_steps=spec.steps,
        per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=spec.batch // spec.micro_batch,
        learning_rate=spec.learning_rate,
        beta=BETA,
        max_length=spec.max_length,
        seed=spec.seed,
        logging_steps=1,
        disable_tqdm=True,
        bf16=False,  # float32 like dpokit on CPU; TRL's default bf16 would compare two precisions
        **settings,
    )
    peft_config = LoraConfig(**LORA, task_type="CAUSAL_LM") if spec.lora else None
    start = time.perf_counter()
    trainer = DPOTrainer(
        model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    init_done = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    return {
        "wall_s": end - start,
        "init_s": init_done - start,
        "steps_s": end - init_done,
        "threads": torch.get_num_threads(),
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss_mb(),
        "losses": [record["loss"] for record in trainer.state.log_history if "loss" in record],
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def child(system: str, spec_path: str) -> None:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if system in TRL_SETTINGS:
        result = run_trl(spec, TRL_SETTINGS[system])
    else:
        result = run_dpokit(spec, checkpointing=system == "dpokit_checkpointing")
    Path(spec.out).write_text(json.dumps(result))


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, int, int]:
    """The model directory, the first steps*batch rows of --data that survive tokenization as a file, their
    number and their tokens (2*prompt + chosen + rejected, after truncation, as every system counts them)."""
    from dpokit.data.reading import load_rows
    from dpokit.data.tokenize import tokenize_rows
    from dpokit.models.loading import load_tokenizer
    from dpokit.models.smollm2 import smollm2_dir

    source = smollm2_dir()
    if args.model == "smollm2":
        model_dir = source
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_tokenizer(str(source))
        model_dir = workdir / "tiny"
        torch.manual_seed(args.seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    rows, _ = load_rows(args.data)
    wanted = args.steps * args.batch
    tokenized = tokenize_rows(tokenizer, rows, args.max_length).pairs[:wanted]
    if len(tokenized) < wanted:
        raise SystemExit(f"{args.data}: {len(tokenized)} usable rows, {wanted} needed for {args.steps} steps")
    records = Path(args.data).read_text().split("\n")  # TokenizedPair.line: the 1-based line of a JSONL row
    data = workdir / "pairs.jsonl"
    data.write_text("".join(records[pair.line - 1] + "\n" for pair in tokenized))
    return model_dir, data, wanted, sum(pair.num_tokens for pair in tokenized)


def summarise(results: dict[str, dict], tokens: int, lora: bool) -> dict:
    """Ratios dpokit / each TRL system, and dpokit's model-FLOPs utilisation; formulas in benchmarks/README.md."""
    for result in results.values():
        result["tokens_per_s"] = tokens / result["wall_s"]
    summary: dict = {}
    for variant in set(results) - set(TRL_SETTINGS):
        prefix = "" if variant == "dpokit" else f"{variant}_"
        for system in set(results) & set(TRL_SETTINGS):
            name = "trl_default" if system == "trl" else system
            ratio = results[variant]["tokens_per_s"] / results[system]["tokens_per_s"]
            summary[f"{prefix}throughput_ratio_vs_{name}"] = ratio
            ratio = results[variant]["peak_rss_mb"] / results[system]["peak_rss_mb"]
            summary[f"{prefix}peak_memory_ratio_vs_{name}"] = ratio
    ours = results.get("dpokit")
    if ours is None:
        return summary
    train_factor = 4 if lora else 6  # LoRA: forward + input gradients; full: + weight gradients
    n, head = ours["matmul_params"], ours["head_params"]
    useful = (train_factor + 2) * n * tokens  # + one forward for the reference pass
    # What dpokit actually runs: the body on each prompt once, the output layer on answer tokens only, and
    # there one more forward, recomputed in backward by the chunked log-probs.
    executed = (train_factor + 2) * (n - head) * ours["executed_tokens"]["body"]
    executed += (train_factor + 4) * head * ours["executed_tokens"]["head"]
    roof = ours["wall_s"] * ours["matmul_flops_per_s"]
    summary.update(
        matmul_flops_per_s=ours["matmul_flops_per_s"],
        dpokit_model_flops=useful,
        dpokit_mfu=useful / roof,
        dpokit_executed_flops=executed,
        dpokit_hardware_flops_utilisation=executed / roof,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step (effective batch)")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per forward (TRL's default 8)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, help="default 1e-6 (tiny), 2e-5 (smollm2 LoRA)")
    parser.add_argument("--token-budget", type=int, default=2048, help="dpokit: tokens per packed row")
    parser.add_argument("--chunk-size", type=int, default=1024, help="dpokit: tokens per output-layer chunk")
    parser.add_argument("--threads", type=int, help="torch threads in every child (default: torch's)")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"of dpokit, dpokit_checkpointing, {', '.join(TRL_SETTINGS)}",
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

    lora = args.model == "smollm2"
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        workdir = Path(tmp)
        model_dir, data, num_pairs, tokens = prepare(args, workdir)
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
                subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
                runs[system].append(json.loads(Path(spec.out).read_text()))
    # Each system's fastest run: the machine's noise only ever slows a run down.
    results = {system: min(done, key=lambda run: run["wall_s"]) for system, done in runs.items()}
    for system, result in results.items():
        result["runs_wall_s"] = [run["wall_s"] for run in runs[system]]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "lora": lora}
    report |= {name: getattr(args, name) for name in SPEC_FROM_ARGS}
    report |= {"pairs": num_pairs, "tokens": tokens, "systems": results}
    report.update(summarise(results, tokens, lora))
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "systems"}, indent=2))


if __name__ == "__main__":
    main()
