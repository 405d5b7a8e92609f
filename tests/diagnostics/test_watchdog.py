"""The watchdog reports each finding once, at the step it appears, and stops on critical ones if asked."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dpokit.diagnostics.doctor import diagnose
from dpokit.diagnostics.findings import sort_findings
from dpokit.diagnostics.rules import FLAT_WINDOW, WINDOW, run_rules
from dpokit.diagnostics.watchdog import Watchdog, WatchdogStop
from dpokit.errors import DpokitError


def _stream(watchdog: Watchdog, records: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """Feed every record; return (split, step, code) for each finding, where it was reported."""
    return [(r["split"], r["step"], f.code) for r in records for f in watchdog.update(r)]


def test_healthy_run_never_warns(healthy_records, healthy_config, healthy_samples):
    """No false alarm at any step: every prefix of the healthy run is quiet."""
    watchdog = Watchdog(healthy_config)
    assert _stream(watchdog, healthy_records) == []
    assert watchdog.update_samples(healthy_samples) == []


def test_flat_loss_reported_once_at_step_40(flat_records, healthy_config):
    """Warmup ends at step 20, so steps 21-40 are the first full window after it."""
    assert _stream(Watchdog(healthy_config), flat_records) == [("train", 40, "flat_loss")]


def test_hyperparameters_reported_with_the_first_record(flat_records, healthy_config):
    watchdog = Watchdog(healthy_config | {"num_epochs": 5})
    assert [f.code for f in watchdog.update(flat_records[0])] == ["num_epochs_out_of_range"]
    assert watchdog.update(flat_records[1]) == []


def test_divergence_reported_at_step_169(healthy_records, healthy_config):
    """Chosen answers lose 1.5 * (step - 100) / 100 nats per token after step 100. The last five records
    of step s average (s - 102) / 100 of it, so the drop passes 1.0 nat/token at s = 169 (1.005)."""
    for record in healthy_records:
        if record["split"] == "train" and record["step"] > 100:
            record["logps/chosen"] = record["lengths/chosen"] * (-1.1 - 1.5 * (record["step"] - 100) / 100)
    assert _stream(Watchdog(healthy_config), healthy_records) == [("train", 169, "divergence")]


def test_reward_hacking_reported_at_the_first_eval_after_saturation(healthy_records, healthy_config):
    for record in healthy_records:
        record["rewards/accuracies"] = 0.62 if record["split"] == "eval" else 1.0
    assert _stream(Watchdog(healthy_config), healthy_records) == [("eval", 50, "reward_hacking")]


def _nan_from_step_150(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for record in records:
        if record["step"] >= 150:
            record["loss"] = math.nan
    return records


def test_nan_reported_once(healthy_records, healthy_config):
    found = _stream(Watchdog(healthy_config), _nan_from_step_150(healthy_records))
    assert found == [("train", 150, "non_finite_metrics")]


def test_stop_on_critical_stops_at_the_nan(healthy_records, healthy_config):
    watchdog = Watchdog(healthy_config, stop_on_critical=True)
    records = _nan_from_step_150(healthy_records)
    with pytest.raises(WatchdogStop) as stopped:
        for record in records:
            watchdog.update(record)
    assert record["step"] == 150 and record["split"] == "train"
    assert isinstance(stopped.value, DpokitError)
    assert [f.code for f in stopped.value.findings] == ["non_finite_metrics"]
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith(
        "watchdog stopped training at step 150: NaN or infinite metrics (non_finite_metrics)"
    )


def test_stop_on_critical_from_samples(healthy_records, healthy_config, healthy_samples):
    watchdog = Watchdog(healthy_config, stop_on_critical=True)
    _stream(watchdog, healthy_records)
    for sample in healthy_samples:
        if sample["source"] == "policy":
            sample["repetition"] = 0.9
    with pytest.raises(WatchdogStop, match="gibberish"):
        watchdog.update_samples(healthy_samples)


def test_warnings_do_not_stop(flat_records, healthy_config):
    assert _stream(Watchdog(healthy_config, stop_on_critical=True), flat_records) == [
        ("train", 40, "flat_loss")
    ]


class _Tracked(dict):
    """A metric record that notes in ``reads`` each time it is read."""

    def __init__(self, record: dict[str, Any], reads: set[int]) -> None:
        super().__init__(record)
        self.reads = reads

    def __getitem__(self, key: str) -> Any:
        self.reads.add(id(self))
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.reads.add(id(self))
        return super().get(key, default)

    def items(self):
        self.reads.add(id(self))
        return super().items()


def test_records_read_per_update_do_not_grow_with_the_run(long_records, healthy_config):
    """Over 2000 steps (2040 records), an update reads at most 26 records: the flat-loss window of the last
    20 train records, the first 5 (the start that divergence compares against) and the new one. Re-running
    the rules over the whole history would read all 2040 by the end."""
    reads: set[int] = set()
    watchdog = Watchdog(healthy_config)
    per_update = []
    for record in long_records:
        reads.clear()
        watchdog.update(_Tracked(record, reads))
        per_update.append(len(reads))
    assert len(per_update) == 2040
    assert max(per_update) == FLAT_WINDOW + WINDOW + 1 == 26
    assert per_update[:3] == [1, 2, 3]
    assert max(per_update[:100]) == max(per_update[-100:]) == 26


def test_watchdog_reports_what_the_doctor_finds_as_the_run_grows(
    make_run, healthy_records, healthy_config, healthy_samples
):
    """The doctor reads the whole history from the run directory after every record; the watchdog sees each
    record once. They name the same findings, with the same steps, at the same records; and at the end the
    watchdog's view of the run gives exactly the doctor's findings."""
    config = healthy_config | {"num_epochs": 5}
    for record in healthy_records:
        record["rewards/accuracies"] = 0.62 if record["split"] == "eval" else 1.0
    records = _nan_from_step_150(healthy_records)
    for sample in healthy_samples:
        if sample["source"] == "policy":
            sample["repetition"] = 0.9
    watchdog = Watchdog(config)
    streamed = [(r["split"], r["step"], f.code, f.step) for r in records for f in watchdog.update(r)]
    streamed += [("samples", 200, f.code, f.step) for f in watchdog.update_samples(healthy_samples)]

    doctor: list[tuple[str, int, str, int | None]] = []
    prefixes = [(records[:end], None, records[end - 1]) for end in range(1, len(records) + 1)]
    for prefix, samples, last in prefixes + [(records, healthy_samples, {"split": "samples", "step": 200})]:
        for finding in diagnose(make_run(prefix, config=config, samples=samples)):
            if finding.code not in {code for _, _, code, _ in doctor}:
                doctor.append((last["split"], last["step"], finding.code, finding.step))

    assert streamed == [
        ("train", 1, "num_epochs_out_of_range", None),
        ("eval", 50, "reward_hacking", 50),
        ("train", 150, "non_finite_metrics", 150),
        ("samples", 200, "gibberish", 200),
    ]
    assert doctor == streamed
    assert sort_findings(run_rules(watchdog.run)) == diagnose(make_run(records, config, healthy_samples))
