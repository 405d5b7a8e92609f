"""`dpokit eval` and `dpokit export`: preference metrics of a saved policy, and a merged standalone model."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from dpokit.atomic import write_atomic
from dpokit.data.prepare import load_pairs
from dpokit.errors import DpokitError
from dpokit.evaluate import evaluate_pairs
from dpokit.logprobs import compute_logps, padded_pair_logps
from dpokit.losses import LOSSES, REFERENCE_FREE, LossParams
from dpokit.models.loading import adapter_base, load_adapter, load_model, load_tokenizer, reference_context
from dpokit.train.output import save_final


def eval_command(
    policy_path: str,
    reference_path: str | None,
    data: str,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    max_length: int,
    batch_size: int,
    json_out: Path | None,
) -> dict[str, float]:
    """Mean preference metrics (TRL's names) of a policy on a dataset; the reference defaults to the base
    model with adapters disabled when the policy is a PEFT adapter."""
    if loss_type not in LOSSES:
        raise DpokitError(f"--loss-type: unknown loss {loss_type!r} (choose from {', '.join(LOSSES)})")
    # The same bounds as the config's fields: outside them the metrics are inf/nan or the command crashes.
    if beta <= 0:
        raise DpokitError(f"--beta: must be greater than 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise DpokitError(f"--label-smoothing: must be in [0, 0.5), got {label_smoothing}")
    if batch_size < 1:
        raise DpokitError(f"--batch-size: must be at least 1, got {batch_size}")
    tokenizer = load_tokenizer(policy_path)
    pairs, report = load_pairs(data, tokenizer, max_length)
    base = adapter_base(policy_path)
    policy = load_adapter(policy_path, load_model(base)) if base else load_model(policy_path)
    policy.eval()
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    reference_logps = None
    if loss_type not in REFERENCE_FREE:
        if reference_path is None and base is None:
            raise DpokitError(f"--reference: {policy_path} is a full model, so the reference must be given")
        reference = load_model(reference_path).eval() if reference_path else None
        with reference_context(policy, reference) as model:
            reference_logps = compute_logps(model, pairs, logps_fn, batch_size, "reference log-probs")
    params = LossParams(beta=beta, label_smoothing=label_smoothing)
    metrics = evaluate_pairs(policy, pairs, reference_logps, loss_type, params, logps_fn, batch_size)
    metrics["num_pairs"] = len(pairs)
    metrics["dropped_long_prompts"] = report.dropped_long_prompts
    if json_out is not None:
        write_atomic(json_out, json.dumps(metrics, indent=2))
    return metrics


def export_command(run_dir: Path, out: Path, merge: bool, checkpoint: str | None = None) -> Path:
    """Write a standalone model from a run's final weights, or from one of its checkpoints (sharded FSDP2 ones
    included, read in this one process); LoRA adapters are merged into the base when asked."""
    if checkpoint is not None:
        return export_checkpoint(run_dir, out, merge, checkpoint)
    final = run_dir / "final"
    if not final.exists():
        raise DpokitError(f"{run_dir}: no final model (train to the end, or pass a run directory)")
    base = adapter_base(str(final))
    if base is not None and not merge:
        raise DpokitError(f"{final}: holds a LoRA adapter; pass --merge to fold it into the base model")
    model = load_adapter(str(final), load_model(base)).merge_and_unload() if base else load_model(str(final))
    return save_final(model, load_tokenizer(str(final)), out)


def export_checkpoint(run_dir: Path, out: Path, merge: bool, name: str) -> Path:
    """The model as checkpoint `name` (step-N, or latest) of `run_dir` holds it: the run's starting model as
    its config.yaml loads it, with the checkpoint's trained weights read in (a LoRA run: its adapters)."""
    import torch
    from safetensors.torch import load_file

    from dpokit.config import load_config
    from dpokit.models.loading import is_peft
    from dpokit.train.checkpoint import latest_checkpoint
    from dpokit.train.precision import resolve_precision
    from dpokit.train.run import load_policy
    from dpokit.train.sharded_checkpoint import is_sharded_checkpoint, load_sharded_weights, sharded_engine

    path = latest_checkpoint(run_dir) if name == "latest" else run_dir / "checkpoints" / name
    if path is None or not (path / "progress.json").exists():
        raise DpokitError(f"--checkpoint: {run_dir} has no complete checkpoint {name!r}")
    if sharded_engine(path) == "zero3":
        raise DpokitError(
            f"--checkpoint: {path} holds DeepSpeed ZeRO-3 partitions, which export does not read; "
            "export the run's final/ (gathered from them), or --resume the run to its end first"
        )
    config = load_config(run_dir / "config.yaml")
    model = load_policy(config, resolve_precision(config.precision, torch.device("cpu")), torch.device("cpu"))
    if is_sharded_checkpoint(path):
        load_sharded_weights(path, model)
    else:
        model.load_state_dict(load_file(str(path / "trainable.safetensors")), strict=False)
    if is_peft(model) and merge:
        model = model.merge_and_unload()
    return save_final(model, load_tokenizer(config.model, config.trust_remote_code), out)
