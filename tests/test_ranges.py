"""The recommended ranges as one leaf module: the check itself, and no config -> diagnostics import."""

from __future__ import annotations

import ast
from pathlib import Path

import dpokit
from dpokit.ranges import out_of_range


def test_beta_between_range_and_tolerated_high_is_only_a_note():
    """Beta's range is 0.01-0.1, tolerated up to 0.2: 0.15 is above but tolerated, 0.3 is not."""
    [noted] = out_of_range({"beta": 0.15})
    [warned] = out_of_range({"beta": 0.3})
    assert (noted.below, noted.tolerated, warned.tolerated) == (False, True, False)
    assert warned.title == "beta = 0.3 is above the recommended range"
    assert warned.recommended == "recommended 0.01-0.1"


def test_only_finite_numbers_are_checked():
    """A hand-edited config.yaml may hold anything; only real numbers are compared with the ranges."""
    config = {"beta": "high", "learning_rate": float("inf"), "num_epochs": True, "effective_batch_size": 16}
    [found] = out_of_range(config)
    assert (found.range.key, found.value, found.below) == ("effective_batch_size", 16, True)


def test_config_and_ranges_import_nothing_from_diagnostics():
    """No cycle: the config and the ranges it checks are leaves below diagnostics. Read from the sources'
    imports (importing `dpokit` itself loads the whole public API, diagnostics included)."""
    for module in ("config", "ranges"):
        tree = ast.parse((Path(dpokit.__file__).parent / f"{module}.py").read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        imported |= {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        assert not {name for name in imported if name.startswith("dpokit.diagnostics")}, module
