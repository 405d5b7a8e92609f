"""The recommended ranges as one leaf module: the check itself, and no config -> diagnostics import."""

from __future__ import annotations

import subprocess
import sys

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


def test_config_imports_nothing_from_diagnostics():
    code = "import sys, dpokit.config; print(sorted(m for m in sys.modules if m.startswith('dpokit.diag')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
