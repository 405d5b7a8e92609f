"""Precision (SPEC §9): fp32 master weights under bf16 autocast keep DPO-sized updates that a bf16 cast loses."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_invariants import losses_by_step, make_config
from torch.testing import assert_close

from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.packing.chunked import ChunkedLinearLogps, dense_token_logps
from dpokit.train.loop import train
from dpokit.train.precision import resolve_precision
from dpokit.train.run import setup_run

LR = 1e-6


def first_step_moves(tmp_path, tiny_model_dir, standard_file, precision):
    """|w1 - w0| / LR per weight after one step at LR, against the start rounded to the stored dtype."""
    config = make_config(tmp_path / precision, tiny_model_dir, standard_file, precision=precision)
    config.learning_rate, config.max_steps = LR, 1
    start = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(train(config) / "final" / "model.safetensors")
    return {
        name: (final[name].float() - start[name].to(final[name].dtype).float()).abs().flatten() / LR
        for name in start
    }


def test_bf16_mixed_lands_every_first_adam_step_that_bf16_pure_loses(tiny_model_dir, standard_file, tmp_path):
    """AdamW's first update is lr * g / (|g| + eps), i.e. |dw| = lr wherever |g| >> eps = 1e-8.

    Weights with a nonzero gradient are those the fp32 run moved. bf16-mixed steps fp32 master weights:
    99% of them move by lr within 1% (the rest have |g| near eps and move less, as in fp32), none by more
    than fp32 rounding.
    bf16-pure steps bf16 weights of ~1e-2, whose spacing (~4e-5) is 40x lr: almost every update rounds away
    (measured: 0.01% land, 2% move at all, by a whole bf16 spacing).
    """
    runs = {
        p: first_step_moves(tmp_path, tiny_model_dir, standard_file, p)
        for p in ("fp32", "bf16-mixed", "bf16-pure")
    }
    trained = {name: moves > 0 for name, moves in runs["fp32"].items()}
    assert sum(int(m.sum()) for m in trained.values()) > 30_000

    def share(precision, within):
        hits = sum(int(within(runs[precision][n][m]).sum()) for n, m in trained.items())
        return hits / sum(int(m.sum()) for m in trained.values())

    def lands(moves):
        return (moves - 1).abs() < 0.01

    assert share("bf16-mixed", lands) > 0.99
    assert share("bf16-mixed", lands) == pytest.approx(share("fp32", lands), abs=1e-3)
    assert share("bf16-mixed", lambda moves: moves > 0) > 0.999
    # No step overshoots lr beyond fp32's own rounding: its spacing below 1.0 (norm weights) is 6e-8 = 0.06 lr.
    assert max(float(m.max()) for m in runs["bf16-mixed"].values()) < 1.06
    assert share("bf16-pure", lands) < 0.001
    assert share("bf16-pure", lambda moves: moves > 0) < 0.05


def test_bf16_mixed_loss_curve_matches_fp32(tiny_model_dir, standard_file, tmp_path):
    """Four steps at lr 1e-3: bf16-mixed losses equal fp32's within rtol 2^-8 (one bf16 rounding of the
    loss's inputs; the log-probs are reduced in fp32, so the rounding does not grow with length).
    Measured: 2e-4 relative at worst."""
    curves = {}
    for precision in ("fp32", "bf16-mixed"):
        config = make_config(tmp_path / precision, tiny_model_dir, standard_file, precision=precision)
        config.max_steps = 4
        curves[precision] = losses_by_step(train(config))
    assert list(curves["fp32"]) == [1, 2, 3, 4]
    assert curves["fp32"][4] < curves["fp32"][1] - 0.05  # the curve moves, so the comparison means something
    assert_close(
        torch.tensor(list(curves["bf16-mixed"].values())),
        torch.tensor(list(curves["fp32"].values())),
        rtol=2**-8,
        atol=0.0,
    )


def test_bf16_mixed_stores_frozen_weights_in_bf16_and_trained_ones_in_fp32(
    tiny_model_dir, tiny_reference_dir, standard_file, tmp_path
):
    """LoRA: the base (which is the reference, adapters disabled) is bf16, the adapters fp32. Full
    fine-tuning: the policy is fp32, the separate reference bf16."""
    lora = make_config(
        tmp_path / "lora", tiny_model_dir, standard_file, precision="bf16-mixed", use_lora=True
    )
    run = setup_run(lora, Console(quiet=True))
    dtypes = {name: p.dtype for name, p in run.policy.named_parameters()}
    adapters = {dtype for name, dtype in dtypes.items() if "lora_" in name}
    base = {dtype for name, dtype in dtypes.items() if "lora_" not in name}
    assert run.reference is None and adapters == {torch.float32} and base == {torch.bfloat16}
    assert all(p.requires_grad == ("lora_" in n) for n, p in run.policy.named_parameters())

    full = make_config(
        tmp_path / "full",
        tiny_model_dir,
        standard_file,
        precision="bf16-mixed",
        reference_model=str(tiny_reference_dir),
    )
    run = setup_run(full, Console(quiet=True))
    assert {p.dtype for p in run.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in run.reference.parameters()} == {torch.bfloat16}


def test_chunked_logps_under_autocast_compute_an_fp32_head(tiny_model_dir):
    """Under bf16 autocast with bf16 hidden states and an fp32 head, the chunked path equals the dense
    fp32 log-probs of the same (bf16-valued) hidden states to fp32 rounding, gradients included."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 8).bfloat16().float().requires_grad_()
    weight = (torch.randn(20, 8) / 3).requires_grad_()
    targets = torch.randint(0, 20, (10,))
    head = torch.nn.Linear(8, 20, bias=False)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    want = dense_token_logps(head, hidden, targets)
    want.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = hidden.detach().bfloat16().requires_grad_()
        got = ChunkedLinearLogps.apply(low, weight, None, targets, 4)
    got.sum().backward()
    assert got.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    assert_close(got, want)
    assert_close(weight.grad, head.weight.grad)
    assert_close(low.grad.float(), hidden.grad, rtol=2**-8, atol=1e-6)  # the grad is returned in bf16


def test_fp16_mixed_runs_end_to_end_on_cpu(tiny_model_dir, standard_file, tmp_path):
    """fp16 autocast and the gradient scaler on CPU: two steps, fp32 weights that moved, finite losses."""
    with torch.autocast("cpu", dtype=torch.float16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.float16:
            pytest.skip("this torch's CPU autocast does not support float16")
    config = make_config(tmp_path, tiny_model_dir, standard_file, precision="fp16-mixed")
    config.max_steps = 2
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("grad_norm" in r or r["skipped"] == 1.0 for r in steps)
    start = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
    assert not torch.equal(final["lm_head.weight"], start["lm_head.weight"])


def test_auto_is_fp32_on_cpu():
    precision = resolve_precision("auto", torch.device("cpu"))
    assert precision.name == "fp32" and precision.trainable_dtype == precision.frozen_dtype == torch.float32
    assert precision.grad_scaler() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_is_bf16_mixed_on_a_bf16_gpu():
    precision = resolve_precision("auto", torch.device("cuda"))
    assert precision.name == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32")
    assert precision.trainable_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def test_old_dtype_field_is_a_one_line_error():
    with pytest.raises(DpokitError) as error:
        load_config(None, ["dtype=bfloat16"])
    message = str(error.value)
    assert message.startswith("field 'dtype': removed; use precision") and "\n" not in message


def test_bf16_pure_warns_at_load():
    with pytest.warns(UserWarning, match="bf16-pure .* updates below bf16's resolution .* are lost"):
        config = load_config(None, ["precision=bf16-pure"])
    assert config.precision == "bf16-pure"
