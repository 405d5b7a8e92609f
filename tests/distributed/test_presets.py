"""`--distributed`: every shipped preset is a valid accelerate config that names its engine; the engine comes
from the flag, else from what `accelerate launch` put in the environment; misuses fail with one line."""

from __future__ import annotations

import pytest
import yaml
from rich.console import Console
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

from dpokit.cli import app
from dpokit.distributed import PRESETS, Engine, first_process, preset_path, progress, resolve_engine
from dpokit.errors import DpokitError
from dpokit.train.run import setup_run
from tiny_models import STANDARD_ROWS, tiny_run_config, write_jsonl

LAUNCHER_VARIABLES = (
    "WORLD_SIZE",
    "LOCAL_RANK",
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "FSDP_VERSION",
)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_an_accelerate_config_file(name):
    config = yaml.safe_load(preset_path(name).read_text())
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["mixed_precision"] == "no", "dpokit's own precision field decides"


def test_presets_name_their_engines(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_engine("ddp") == Engine("ddp")
    assert resolve_engine("fsdp2") == Engine("fsdp2")
    assert resolve_engine("fsdp2-offload") == Engine("fsdp2", offload=True)
    assert resolve_engine(str(preset_path("fsdp2-offload"))) == Engine("fsdp2", offload=True)
    assert resolve_engine(None) == Engine("ddp"), "several processes and no flag: DDP"


def test_accelerate_launch_environment_picks_fsdp2(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_engine(None) == Engine("fsdp2")


def test_deepspeed_preset_is_zero3(monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_engine("deepspeed-zero3") == Engine("zero3")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_engine(None) == Engine("zero3"), "accelerate launch with the preset"
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(DpokitError, match="deepspeed-zero3 needs a launcher"):
        resolve_engine("deepspeed-zero3")


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        ({"zero_stage": 2}, "zero_stage must be 3"),
        ({"zero_stage": 3, "offload_optimizer_device": "cpu"}, "offload_optimizer_device must be none"),
        ({"zero_stage": 3, "deepspeed_config_file": "ds.json"}, "deepspeed_config_file is not read"),
    ],
)
def test_deepspeed_configs_dpokit_does_not_run_are_refused_in_one_line(tmp_path, deepspeed, message):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": deepspeed}))
    with pytest.raises(DpokitError, match=message) as error:
        resolve_engine(str(path))
    assert "\n" not in str(error.value)


def test_one_process_without_a_launcher_is_single():
    assert resolve_engine(None) == Engine("single")
    assert resolve_engine("single") == Engine("single")


@pytest.mark.parametrize(
    ("flag", "environment", "message"),
    [
        ("zero9", {}, "unknown preset 'zero9'"),
        ("missing.yaml", {}, "missing.yaml does not exist"),
        ("fsdp2", {}, "fsdp2 needs a launcher"),
        ("fsdp2-offload", {}, "^--distributed: fsdp2-offload needs a launcher"),
        ("single", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "'single' runs one process"),
        (
            None,
            {"LOCAL_RANK": "0", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
            "fsdp_version must be 2",
        ),
    ],
)
def test_misuse_is_one_line_naming_the_flag(monkeypatch, flag, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DpokitError, match=message) as error:
        resolve_engine(flag)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed-zero3"])
def test_qlora_under_a_sharded_engine_is_refused_in_one_line(monkeypatch, tmp_path, tiny_model_dir, engine):
    """QLoRA's 4-bit base is not sharded by dpokit: refused before any model is loaded, naming the field."""
    if engine == "deepspeed-zero3":
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under a launcher
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD_ROWS)
    config = tiny_run_config(tmp_path, tiny_model_dir, data, use_lora=True, load_in_4bit=True)
    with pytest.raises(
        DpokitError, match="^load_in_4bit: QLoRA under (fsdp2|zero3) is not supported"
    ) as error:
        setup_run(config, Console(stderr=True), distributed=engine)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_only_the_first_process_shows_warnings_and_progress_bars(monkeypatch, rank, shown):
    """Every process of a launched run meets the same warnings and runs the same loops; 8 GPUs would print
    each warning and bar 8 times. The launcher's RANK decides, before any process group exists."""
    monkeypatch.setenv("RANK", rank)
    assert first_process() is shown
    assert progress(range(3)).disable is not shown
    try:
        result = CliRunner().invoke(
            app,
            [
                "train",
                "use_lora=false",
                "learning_rate=1e-4",
                "allow_risky_hyperparameters=true",
                "--print-config",
            ],
        )
        assert transformers_logging.is_progress_bar_enabled() is shown
    finally:
        transformers_logging.enable_progress_bar()
    assert result.exit_code == 0, result.output
    assert ("learning_rate = 0.0001 is above the recommended range" in result.output) is shown
    assert yaml.safe_load(result.stdout[result.stdout.index("model:") :])["learning_rate"] == 1e-4
