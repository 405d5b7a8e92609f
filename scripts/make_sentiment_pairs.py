"""Build dpokit's shipped preference data for controlled sentiment generation.

The task of the DPO paper's first experiment (Rafailov et al. 2023, section 6): given a movie-review
prompt, prefer the more positive answer. For each made-up review prompt we sample K answers from
SmolLM2-135M-Instruct, score them with VADER, and pair the most positive (chosen) with the most
negative (rejected). Writes, under --out-dir:

    sentiment_pairs.jsonl            train pairs (conversational TRL format, plus both scores)
    sentiment_pairs_heldout.jsonl    eval pairs, on prompts disjoint from train
    sentiment_prompts_heldout.txt    prompts in neither file, to score fresh generations

Run from the repository root (about 8 minutes on 2 idle CPU cores):

    python scripts/make_sentiment_pairs.py

Quick timing check on a few prompts, written elsewhere:

    python scripts/make_sentiment_pairs.py --num-prompts 32 --num-heldout-pair-prompts 8 --out-dir /tmp/pairs
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpokit.judges import vader_score
from dpokit.models.smollm2 import smollm2_dir

RESOURCES = Path(__file__).resolve().parents[1] / "src" / "dpokit" / "resources"

# Small word lists combined into unique made-up titles; each title is used by one prompt only, so
# train, held-out pairs and held-out prompts never share a film.
TITLE_ADJECTIVES = [
    "Silent", "Last", "Crimson", "Hidden", "Broken", "Golden", "Endless", "Frozen", "Midnight",
    "Distant", "Burning", "Forgotten", "Electric", "Hollow", "Wandering", "Paper", "Velvet",
    "Iron", "Shattered", "Secret", "Lonely", "Wild", "Quiet", "Fading",
]  # fmt: skip
TITLE_NOUNS = [
    "Harbor", "Garden", "Empire", "Horizon", "Letter", "Orchard", "Station", "River", "Mirror",
    "Kingdom", "Lighthouse", "Carnival", "Frontier", "Voyage", "Promise", "Winter", "Signal",
    "Island", "Summer", "Machine", "Witness", "Crown", "Highway", "Tide",
]  # fmt: skip
GENRES = [
    "horror", "comedy", "drama", "science fiction", "romance", "thriller", "western", "fantasy",
    "animated", "documentary", "musical", "crime", "war", "mystery", "family", "action",
]  # fmt: skip
PHRASINGS = [
    "Write a short review of the movie '{title}', {a_genre} film.",
    "I just watched '{title}'. Can you write a quick review of this {genre} movie?",
    "Give me a two-sentence review of the {genre} film '{title}'.",
    "What did you think of '{title}'? Write a brief review of this {genre} movie.",
    "Review the {genre} movie '{title}' in a few sentences.",
    "Write a short movie review for '{title}', {a_genre} film released last year.",
    "My friends keep talking about the {genre} movie '{title}'. Write a short review of it.",
    "Write a few lines reviewing '{title}', the new {genre} film.",
]


def make_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct review prompts, each about a different made-up film."""
    rng = random.Random(seed)
    titles = [f"The {adj} {noun}" for adj, noun in itertools.product(TITLE_ADJECTIVES, TITLE_NOUNS)]
    if count > len(titles):
        raise SystemExit(f"--num-prompts too large: at most {len(titles)} distinct titles")
    prompts = []
    for title in rng.sample(titles, count):
        genre = rng.choice(GENRES)
        a_genre = f"{'an' if genre[0] in 'aeiou' else 'a'} {genre}"
        prompts.append(rng.choice(PHRASINGS).format(title=title, genre=genre, a_genre=a_genre))
    return prompts


@torch.no_grad()
def sample_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], args: argparse.Namespace
) -> list[list[str]]:
    """``args.samples_per_prompt`` sampled answers for each prompt, batched with left padding."""
    answers: list[list[str]] = []
    k = args.samples_per_prompt
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
        batch = prompts[start : start + args.batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in batch
        ]
        # The chat template already holds the special tokens; the tokenizer must not add more.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
        )  # (len(batch) * k, T_prompt + T_new), the k samples of a prompt adjacent
        decoded = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        answers += [[text.strip() for text in decoded[i : i + k]] for i in range(0, len(decoded), k)]
    return answers


def make_pairs(prompts: list[str], answers: list[list[str]], min_gap: float) -> list[dict]:
    """The most positive vs the most negative answer of each prompt, when they differ by ``min_gap``."""
    rows = []
    for prompt, candidates in zip(prompts, answers, strict=True):
        # An empty answer has no tokens for DPO to score, so it cannot be chosen or rejected.
        candidates = [text for text in candidates if text]
        if len(candidates) < 2:
            continue
        scores = vader_score(candidates)
        best = max(range(len(candidates)), key=scores.__getitem__)
        worst = min(range(len(candidates)), key=scores.__getitem__)
        if scores[best] - scores[worst] < min_gap or candidates[best] == candidates[worst]:
            continue
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": candidates[best]}],
                "rejected": [{"role": "assistant", "content": candidates[worst]}],
                "chosen_score": scores[best],
                "rejected_score": scores[worst],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept readable."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def summarize(name: str, rows: list[dict], num_prompts: int) -> None:
    """Print the pair count and the mean VADER score of chosen and rejected answers."""
    mean_chosen = sum(row["chosen_score"] for row in rows) / max(len(rows), 1)
    mean_rejected = sum(row["rejected_score"] for row in rows) / max(len(rows), 1)
    print(
        f"{name}: {len(rows)} pairs from {num_prompts} prompts "
        f"({num_prompts - len(rows)} skipped), mean VADER chosen {mean_chosen:+.3f}, "
        f"rejected {mean_rejected:+.3f}"
    )


def main() -> None:
    """Sample, score and pair answers, then write the three resource files."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=448, help="prompts to sample pairs for")
    parser.add_argument(
        "--num-heldout-pair-prompts", type=int, default=56, help="of --num-prompts, kept for eval pairs"
    )
    parser.add_argument("--num-heldout-prompts", type=int, default=16, help="extra prompts, no pairs")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="K answers sampled per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-gap", type=float, default=0.3, help="min VADER chosen - rejected gap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESOURCES)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    prompts = make_prompts(args.num_prompts + args.num_heldout_prompts, args.seed)
    heldout_prompts = prompts[: args.num_heldout_prompts]
    heldout_pair_prompts = prompts[
        args.num_heldout_prompts : args.num_heldout_prompts + args.num_heldout_pair_prompts
    ]
    train_prompts = prompts[args.num_heldout_prompts + args.num_heldout_pair_prompts :]

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    start = time.perf_counter()
    pair_prompts = train_prompts + heldout_pair_prompts
    answers = sample_answers(model, tokenizer, pair_prompts, args)
    elapsed = time.perf_counter() - start
    train_rows = make_pairs(train_prompts, answers[: len(train_prompts)], args.min_gap)
    heldout_rows = make_pairs(heldout_pair_prompts, answers[len(train_prompts) :], args.min_gap)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "sentiment_pairs.jsonl", train_rows)
    write_jsonl(args.out_dir / "sentiment_pairs_heldout.jsonl", heldout_rows)
    (args.out_dir / "sentiment_prompts_heldout.txt").write_text("\n".join(heldout_prompts) + "\n")

    print(f"sampled {args.samples_per_prompt} answers for {len(pair_prompts)} prompts in {elapsed:.0f} s")
    summarize("train", train_rows, len(train_prompts))
    summarize("held-out", heldout_rows, len(heldout_pair_prompts))
    print(f"held-out prompts: {len(heldout_prompts)}; files written to {args.out_dir}")


if __name__ == "__main__":
    main()
