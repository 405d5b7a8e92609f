"""Write a synthetic preference set whose prompt and answer lengths are long-tailed like real ones.

Real preference sets (UltraFeedback, HH-RLHF, Tulu) have log-normal-like lengths: most prompts are short, a few
are very long, and answers are longer than prompts with a tail of their own; the chosen answer is longer than the
rejected one on average. That shape is what makes padding wasteful, so it is what a packing benchmark needs. The
words are common English words (about one SmolLM2 token each); their content does not matter for speed.

    python benchmarks/make_longtail_data.py                       # benchmarks/data/longtail.jsonl
    python benchmarks/make_longtail_data.py --rows 64 --out /tmp/small.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what no out up into more some time could "
    "them other than then now only its over also after use two how our first well way even new want because any "
    "these give day most us good water long little very make work know place year live back people take number "
    "great think help through much before line right too mean old same tell boy follow came show around form "
    "three small set put end does another large big even such turn here why ask went men read need land different "
    "home move try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw left few while along "
    "might close something seem next hard open example begin life always those both paper together got group often "
    "run important until children side feet car mile night walk white sea began grow took river four carry state "
    "once book hear stop without second later miss idea enough eat face watch far real almost let above girl "
    "sometimes mountain cut young talk soon list song being leave family model data train answer question reason"
).split()

# Median length in words and log-normal sigma of each field; chosen answers run about 20% longer.
PROMPT = (45, 1.0)
ANSWER = (100, 0.8)
CHOSEN_LENGTH_BIAS = 1.2
MAX_WORDS = {"prompt": 350, "answer": 900}  # a prompt must stay under the benchmark's max_length to be kept


def text(rng: random.Random, words: int) -> str:
    """`words` words in sentences of 6 to 18 words."""
    out: list[str] = []
    while len(out) < words:
        sentence = [rng.choice(WORDS) for _ in range(min(rng.randint(6, 18), words - len(out)))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out += sentence
    return " ".join(out)


def length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(0.0, sigma) * median)))


def make_rows(rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        prompt = length(rng, *PROMPT, MAX_WORDS["prompt"])
        chosen = length(rng, ANSWER[0] * CHOSEN_LENGTH_BIAS, ANSWER[1], MAX_WORDS["answer"])
        rejected = length(rng, *ANSWER, MAX_WORDS["answer"])
        out.append(
            {"prompt": text(rng, prompt) + "\n", "chosen": text(rng, chosen), "rejected": text(rng, rejected)}
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "longtail.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in make_rows(args.rows, args.seed)))
    print(f"wrote {args.rows} rows to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
