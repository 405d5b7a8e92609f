"""The typed config: recommended defaults (SPEC §2), overrides, range warnings, errors that name the field."""

import warnings

import pytest

from dpokit.config import load_config
from dpokit.errors import DpokitError


def test_defaults_are_the_recommended_values():
    config = load_config(None)
    assert config.resolved_beta == 0.1
    assert config.num_epochs == 1
    assert config.effective_batch_size == 128
    assert config.warmup_ratio == 0.1
    assert config.resolved_learning_rate == 2e-5  # LoRA default
    assert load_config(None, ["use_lora=false"]).resolved_learning_rate == 1e-6
    assert load_config(None, ["loss_type=simpo"]).resolved_beta == 2.0
    assert load_config(None, ["loss_type=simpo"]).resolved_reference_mode == "none"


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.05\nloss_type: ipo\nlora_target_modules: [q_proj, v_proj]\n")
    config = load_config(path, ["beta=0.08", "max_length=512"])
    assert (config.resolved_beta, config.loss_type, config.max_length) == (0.08, "ipo", 512)
    assert config.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, reason",
    [
        ("beta=0.005", r"beta = 0.005 is below the recommended range \(recommended 0.01-0.1\): .*gibberish"),
        ("beta=0.5", r"beta = 0.5 is above the recommended range \(recommended 0.01-0.1\)"),
        ("learning_rate=5e-4", r"learning_rate = 0.0005 is above .*5e-06-0.0001.*LoRA"),
        ("num_epochs=5", r"num_epochs = 5 is above .*reward hacking"),
        ("effective_batch_size=16", r"effective_batch_size = 16 is below .*gradient accumulation"),
    ],
)
def test_out_of_range_values_warn_with_the_reason(override, reason):
    with pytest.warns(UserWarning, match=reason):
        load_config(None, [override])


def test_in_range_values_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["beta=0.2", "use_lora=false", "learning_rate=2e-6", "num_epochs=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("beta=-1", "field 'beta': Input should be greater than 0"),
        ("loss_type=dpo3", "field 'loss_type': unknown loss 'dpo3'"),
        ("lora_r=0", "field 'lora_r'"),
        ("colour=red", "field 'colour': unknown field"),
        ("learning_rate=1e-2", "field 'learning_rate': 0.01 is over 10x"),
        ("use_lora=false", None),
    ],
)
def test_bad_values_name_the_field(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(DpokitError, match=message):
        load_config(None, [override])


def test_broken_values_run_when_explicitly_allowed():
    with pytest.warns(UserWarning):
        config = load_config(None, ["learning_rate=1e-2", "allow_risky_hyperparameters=true"])
    assert config.resolved_learning_rate == 1e-2


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: [0.1\n")
    with pytest.raises(DpokitError, match=r"bad.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(DpokitError, match=r"missing.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
