"""The report in a real headless Chromium: it renders every plot, logs no console error, and draws pixels.

Needs Chromium (Debian: `apt-get install -y --no-install-recommends chromium`); skipped without it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dpokit.diagnostics.report import CHARTS, write_report

CHROMIUM = Path("/usr/bin/chromium")
# No network, no background services, no sandbox (tests often run as root in containers).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"),
]


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def report(make_run, healthy_records, healthy_samples, tmp_path) -> Path:
    """A report with a finding (train accuracy 1.0 against eval 0.62) and two steps of samples."""
    for record in healthy_records:
        if record["split"] == "eval":
            record["rewards/accuracies"] = 0.62
        elif record["step"] >= 30:
            record["rewards/accuracies"] = 1.0
    return write_report(make_run(healthy_records, samples=healthy_samples), tmp_path / "report.html")


def test_rendered_dom_has_every_plot_and_no_console_error(report, tmp_path):
    result = _chromium(tmp_path / "profile", "--dump-dom", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert dom.count("<svg") == len(CHARTS)
    assert dom.count('class="series"') == sum(len(keys) for _, keys in CHARTS)
    assert "(reward_hacking · step 200)" in dom
    console_errors = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console_errors == []


def test_screenshot_is_not_blank(report, tmp_path):
    image_module = pytest.importorskip(
        "PIL.Image", reason="Pillow decodes the screenshot (tensorboard installs it)"
    )
    png = tmp_path / "report.png"
    result = _chromium(
        tmp_path / "profile", f"--screenshot={png}", "--window-size=1280,2000", report.as_uri()
    )
    assert png.is_file(), result.stderr[-2000:]
    with image_module.open(png) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    background = max(count for count, _ in colours)
    assert len(colours) > 50  # text, plot lines, severity colours, table borders
    assert background < 0.95 * 1280 * 2000  # the page is not one flat colour
