"""`dpokit.iterate` from Python: an IterateConfig or a YAML path with overrides, quiet, and its result."""

from __future__ import annotations

import json

import pytest
import yaml
from test_loop import iterate_config

import dpokit


def test_iterate_returns_the_rounds_and_the_final_policy_quietly(tmp_path, tiny_model_dir, capfd) -> None:
    config = iterate_config(tmp_path, tiny_model_dir, "rounds=1")
    result = dpokit.iterate(config, quiet=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    on_disk = [json.loads(line) for line in (result.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert result.rounds == on_disk and [r["round"] for r in result.rounds] == [0, 1]
    assert result.policy == result.run_dir / "round-1" / "train" / "final"
    assert (result.policy / "adapter_config.json").exists()


def test_a_yaml_path_takes_overrides_and_a_config_object_does_not(tmp_path, tiny_model_dir) -> None:
    config = iterate_config(tmp_path, tiny_model_dir, "rounds=1")
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    with pytest.raises(dpokit.DpokitError, match="field 'rounds'"):
        dpokit.iterate(path, ["rounds=0"], quiet=True)
    with pytest.raises(dpokit.DpokitError, match="overrides apply to a config file"):
        dpokit.iterate(config, ["rounds=2"])
