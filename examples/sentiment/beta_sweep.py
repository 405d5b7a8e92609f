"""The reward-KL trade-off of the sentiment example across betas: one `dpokit iterate` run per beta, one plot.

    python examples/sentiment/beta_sweep.py                        # betas 0.05 0.1 0.5 into runs/beta-sweep/
    python examples/sentiment/beta_sweep.py --betas 0.02 0.1 0.3 --runs runs/my-sweep

Each run is the shipped config with `train.beta=B` and its own output_dir (runs/beta-sweep/beta-B); a run whose
rounds.jsonl already holds every round is not run again, so the plot can be redrawn alone. Writes
examples/sentiment/beta_sweep.png (x: KL to the starting model per answer, y: held-out VADER reward, one line
per beta through its rounds) and prints a Markdown table of each beta's last round. Needs matplotlib
(`pip install -e '.[examples]'`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
CONFIG = HERE / "config.yaml"


def run(beta: float, run_dir: Path, rounds: int) -> list[dict]:
    """The rounds.jsonl records of the run at this beta, running (or resuming) it first when unfinished."""
    log = run_dir / "rounds.jsonl"
    done = log.exists() and len(log.read_text().splitlines()) == rounds + 1
    if not done:
        command = ["dpokit", "iterate", str(CONFIG), f"output_dir={run_dir}", f"train.beta={beta}"]
        subprocess.run(command + (["--resume"] if run_dir.exists() else []), check=True)
    return [json.loads(line) for line in log.read_text().splitlines()]


def plot(results: dict[float, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.2), dpi=120)
    for beta, records in sorted(results.items()):
        kl = [r["kl"] for r in records]
        reward = [r["reward_mean"] for r in records]
        (line,) = axes.plot(kl, reward, marker="o", label=f"beta = {beta:g}")
        for r in records[1:]:  # round 0 is the shared starting point
            axes.annotate(
                str(r["round"]),
                (r["kl"], r["reward_mean"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
                color=line.get_color(),
            )
    axes.set_xlabel("KL(policy || starting model) per answer, nats (held-out samples)")
    axes.set_ylabel("held-out VADER reward (mean)")
    axes.set_title("Sentiment example: reward vs KL by round (numbers: round)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/beta-sweep"), help="one run directory per beta"
    )
    parser.add_argument("--plot", type=Path, default=HERE / "beta_sweep.png")
    args = parser.parse_args()
    rounds = yaml.safe_load(CONFIG.read_text())["rounds"]
    results = {beta: run(beta, args.runs / f"beta-{beta:g}", rounds) for beta in args.betas}
    plot(results, args.plot)
    print(f"wrote {args.plot}\n")
    print("| beta | round | reward_mean | kl | win_rate_vs_reference | length_mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for beta, records in sorted(results.items()):
        last = records[-1]
        print(
            f"| {beta:g} | {last['round']} | {last['reward_mean']:.3f} | {last['kl']:.2f} | "
            f"{last['win_rate_vs_reference']:.3f} | {last['length_mean']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
