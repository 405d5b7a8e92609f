"""`RunConfig.from_trl` and `dpokit train --from-trl`: a TRL 1.16 DPOConfig becomes the dpokit run that computes
the same numbers, or a one-line error naming the field dpokit cannot honour."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from typer.testing import CliRunner

import dpokit
from dpokit.cli import app
from dpokit.trl_config import TRL_DEFAULTS, TRL_IGNORED
from test_eval_trl_parity import METRICS, STANDARD_PAIRS
from tiny_models import write_jsonl


def trl_config(tmp_path, **fields) -> DPOConfig:
    """A DPOConfig that runs on CPU in float32 (TRL's bf16 default would autocast its reference on CPU)."""
    return DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **fields)


def mapped(args: DPOConfig, model_dir, tmp_path, **fields) -> dpokit.RunConfig:
    """`args` mapped to a dpokit run of the tiny model in `tmp_path`, with no samples or trackers."""
    return dpokit.RunConfig.from_trl(
        args,
        model=str(model_dir),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        sample_prompts=None,
        report_to=[],
        allow_risky_hyperparameters=True,  # a tiny random model needs a large rate to move in a few steps
        **fields,
    )


def test_defaults_are_trl_1_16s():
    """The defaults dpokit assumes for fields a YAML leaves out are DPOConfig's own."""
    defaults = {
        f.name: f.default_factory() if callable(f.default_factory) else f.default
        for f in dataclasses.fields(DPOConfig)
    }
    for name, value in TRL_DEFAULTS.items():
        assert defaults[name] == value, name


def test_every_dpo_config_field_is_classified():
    """Each DPOConfig field is read (mapped or checked) or known not to change the numbers, so a name in
    neither list is no DPOConfig field and gets a warning of its own."""
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    alias = {"activation_checkpointing"}  # read as gradient_checkpointing
    assert set(TRL_DEFAULTS) | TRL_IGNORED | alias == names
    assert not set(TRL_DEFAULTS) & TRL_IGNORED


def test_fields_map(tmp_path):
    """Each mapped TRL field lands on its dpokit field; batch = per-device x accumulation x processes."""
    args = trl_config(
        tmp_path,
        beta=0.05,
        loss_type="robust",
        label_smoothing=0.1,
        learning_rate=2e-6,
        num_train_epochs=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        max_length=512,
        precompute_ref_log_probs=True,
        gradient_checkpointing=False,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        seed=7,
        weight_decay=0.01,
    )
    config = dpokit.RunConfig.from_trl(args, processes=2, model="m")
    expected = dict(
        beta=0.05,
        loss_type="robust",
        label_smoothing=0.1,
        learning_rate=2e-6,
        num_epochs=2,
        max_steps=None,
        effective_batch_size=64,
        micro_batch_size=4,
        max_length=512,
        reference_mode="precompute",
        gradient_checkpointing=False,
        warmup_ratio=0.05,
        seed=7,
        weight_decay=0.01,
        output_dir=str(tmp_path / "trl"),
        precision="fp32",
        use_lora=False,
        model="m",
    )
    assert {name: getattr(config, name) for name in expected} == expected
    mapped = dpokit.RunConfig.from_trl(
        {"loss_type": "ipo", "max_steps": 10, "warmup_steps": 2, "lr_scheduler_type": "cosine"}
    )
    assert (mapped.loss_type, mapped.max_steps, mapped.warmup_ratio, mapped.reference_mode) == (
        "ipo",
        10,
        0.2,
        "live",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss_type": "apo_zero"}, r"^field 'loss_type': TRL's 'apo_zero' has no dpokit equivalent"),
        ({"loss_type": ["sigmoid", "sft"]}, r"^field 'loss_type': .* combines losses"),
        ({"lr_scheduler_type": "linear"}, r"^field 'lr_scheduler_type': 'linear' is not supported"),
        ({"truncation_mode": "keep_end"}, r"^field 'truncation_mode': 'keep_end' is not supported"),
        ({"optim": "adafactor"}, r"^field 'optim': 'adafactor' is not supported"),
        ({"num_train_epochs": 1.5}, r"^field 'num_train_epochs': 1.5"),
        ({"warmup_steps": 10}, r"^field 'warmup_steps': 10 steps"),
        ({"warmup_steps": 11, "max_steps": 10}, r"^field 'warmup_steps': 11 steps is more than max_steps 10"),
        ({"data_seed": 3}, r"^field 'data_seed': 3 is not supported"),
        ({"router_aux_loss_coef": 0.01}, r"^field 'router_aux_loss_coef': 0.01 is not supported"),
        (
            {"train_sampling_strategy": "group_by_length"},
            r"^field 'train_sampling_strategy': 'group_by_length'",
        ),
        ({"model_init_kwargs": {"dtype": "bfloat16"}}, r"^field 'model_init_kwargs': dtype bfloat16"),
    ],
)
def test_unsupported_fields_fail_naming_the_field(fields, message):
    with pytest.raises(dpokit.DpokitError, match=message):
        dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine", **fields})


def test_other_objects_fail():
    with pytest.raises(dpokit.DpokitError, match=r"^from_trl: expected a trl.DPOConfig .*, got str$"):
        dpokit.RunConfig.from_trl("trl.yaml")
    with pytest.raises(dpokit.DpokitError, match=r"^from_trl: processes must be at least 1, got 0$"):
        dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine"}, processes=0)


@pytest.mark.parametrize("max_steps", [1, 7, 25, 38, 100, 299])
def test_whole_warmup_steps_map_to_the_same_count(max_steps):
    """TRL warms up int(warmup_steps) steps; dpokit ceil(warmup_ratio * steps). warmup / max_steps can round up
    (7 / 25 * 25 = 7.000000000000001: 8 steps), which once refused valid configs; every count maps exactly."""
    for warmup in range(1, max_steps + 1):
        config = dpokit.RunConfig.from_trl(
            {"lr_scheduler_type": "cosine", "max_steps": max_steps, "warmup_steps": warmup}
        )
        assert math.ceil(config.warmup_ratio * max_steps) == warmup, warmup
    fractional = dpokit.RunConfig.from_trl(
        {"lr_scheduler_type": "cosine", "max_steps": 10, "warmup_steps": 2.5}
    )
    assert math.ceil(fractional.warmup_ratio * 10) == 2  # TRL: int(2.5)


def test_unsupported_loss_in_a_dpo_config_fails(tmp_path):
    with pytest.raises(dpokit.DpokitError, match=r"^field 'loss_type': TRL's 'nca_pair'"):
        dpokit.RunConfig.from_trl(trl_config(tmp_path, loss_type="nca_pair", lr_scheduler_type="cosine"))


def test_label_smoothing_is_ignored_by_sigmoid_as_in_trl():
    """TRL 1.16's sigmoid loss does not read label_smoothing (only robust and EXO do): plain sigmoid, warned."""
    with pytest.warns(UserWarning, match=r"'label_smoothing' is ignored by sigmoid"):
        config = dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine", "label_smoothing": 0.1})
    assert (config.loss_type, config.label_smoothing) == ("sigmoid", 0.0)


def test_fields_that_do_not_change_the_numbers_warn():
    with pytest.warns(
        UserWarning, match=r"ignored TRL fields .*: logging_steps, save_steps \(dpokit: save_every\)"
    ):
        dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine", "logging_steps": 5, "save_steps": 100})


def test_names_that_are_no_dpo_config_field_warn_apart():
    """A typo is not said to "not change the numbers": it is named as no field of DPOConfig."""
    with pytest.warns(UserWarning) as caught:
        config = dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine", "betaa": 0.3, "logging_steps": 5})
    messages = [str(warning.message) for warning in caught if "from_trl" in str(warning.message)]
    assert messages == [
        "from_trl: ignored TRL fields that do not change the numbers here: logging_steps",
        "from_trl: ignored names that are not fields of TRL 1.16's DPOConfig (misspelt, or from another "
        "version?): betaa",
    ]
    assert config.beta == 0.1


def test_activation_checkpointing_is_gradient_checkpointing():
    """transformers 5 renamed gradient_checkpointing activation_checkpointing; DPOConfig keeps both in step."""
    config = dpokit.RunConfig.from_trl({"lr_scheduler_type": "cosine", "activation_checkpointing": False})
    assert config.gradient_checkpointing is False


def train_losses_and_rates(run_dir) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["lr"]) for r in records if r["split"] == "train"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"num_train_epochs": 2, "warmup_steps": 0.25}, id="epochs-warmup-ratio"),
        pytest.param({"max_steps": 5, "warmup_steps": 2}, id="max-steps-past-an-epoch-warmup-steps"),
    ],
)
def test_mapped_run_trains_as_trl(fields, tiny_model_dir, tmp_path):
    """TRL's DPOTrainer and dpokit, each given the same DPOConfig, log the same loss and learning rate at every
    step (within 1e-5): the batch arithmetic (2 per device x 2 accumulation), epochs or max_steps, warmup and
    the cosine schedule, and the seeded order of the pairs (batches of 4 of 8 pairs) all map. The pairs divide
    into whole batches: TRL trains on an epoch's last, smaller batch, dpokit leaves those pairs out."""
    args = trl_config(
        tmp_path,
        learning_rate=1e-3,  # a tiny random model needs a large rate to move in a few steps
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        **fields,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_list(STANDARD_PAIRS),
    )
    trainer.train()
    theirs = [(h["loss"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]
    config = mapped(args, tiny_model_dir, tmp_path, eval_data=None, save_every=0)
    ours = train_losses_and_rates(dpokit.train(config, train_data=STANDARD_PAIRS, quiet=True).run_dir)
    steps = 4 if "num_train_epochs" in fields else 5  # 2 steps of 4 pairs per epoch
    assert len(ours) == len(theirs) == steps
    assert len({loss for loss, _ in ours}) > 2  # the policy moves: the comparison has teeth
    for step, ((loss, rate), (trl_loss, trl_rate)) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert loss == pytest.approx(trl_loss, abs=1e-5), step
        assert rate == pytest.approx(trl_rate, rel=1e-9, abs=1e-15), step


def test_mapped_run_eval_equals_trl_evaluate(tiny_model_dir, tmp_path):
    """A DPOConfig mapped and trained by dpokit: its final eval record equals TRL's `evaluate()` of the trained
    model (reference: the starting model) under the same DPOConfig, within 1e-4."""
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD_PAIRS)
    args = trl_config(
        tmp_path,
        loss_type="robust",
        label_smoothing=0.1,
        beta=0.2,
        learning_rate=1e-3,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=4,  # divides the 8 pairs: TRL's mean of batch means is the mean over pairs
        lr_scheduler_type="cosine",
        warmup_steps=0.5,
    )
    config = mapped(args, tiny_model_dir, tmp_path)
    result = dpokit.train(config, train_data=data, eval_data=data, quiet=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(result.model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_list(STANDARD_PAIRS),
        eval_dataset=Dataset.from_list(STANDARD_PAIRS),
    )
    theirs = trainer.evaluate()
    assert result.eval_metrics["step"] == 2
    assert 0 < theirs["eval_rewards/accuracies"]
    for name in METRICS:
        assert result.eval_metrics[name] == pytest.approx(theirs[f"eval_{name}"], abs=1e-4), name


def test_cli_from_trl(tiny_model_dir, tmp_path):
    """`dpokit train --from-trl trl.yaml key=value` maps the YAML's DPOConfig fields, then applies overrides."""
    trl_yaml = tmp_path / "trl.yaml"
    trl_yaml.write_text(
        yaml.safe_dump({"beta": 0.3, "lr_scheduler_type": "cosine", "per_device_train_batch_size": 2})
    )
    result = CliRunner().invoke(
        app, ["train", "--from-trl", str(trl_yaml), "--print-config", f"model={tiny_model_dir}", "seed=3"]
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert (printed["beta"], printed["micro_batch_size"], printed["seed"], printed["model"]) == (
        0.3,
        2,
        3,
        str(tiny_model_dir),
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss_type: bco_pair\nlr_scheduler_type: cosine\n")
    result = CliRunner().invoke(app, ["train", "--from-trl", str(bad)])
    assert result.exit_code == 2 and "field 'loss_type'" in result.output
