"""Write the sentiment example's prompt files: train_prompts.txt and heldout_prompts.txt.

    python examples/sentiment/make_prompts.py

Each prompt asks for a short review of a made-up film, book, restaurant or product, with a detail that
leans neutral or negative ("the second half drags", "the battery barely lasts a day"), so that the starting
model's answers are mixed rather than uniformly glowing. Titles are split between the two files: no subject of
a held-out prompt ever appears in a training prompt. Fixed seed, so the files are the same on every run.
"""

from __future__ import annotations

import random
from itertools import product
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
HELDOUT_PER_KIND = 16  # 4 kinds -> 64 held-out prompts
TRAIN_PER_KIND = 80  # 4 kinds -> 320 training prompts

# kind -> (made-up names, details that colour the request)
SUBJECTS = {
    "film": (
        [
            "The Velvet Harbor",
            "Northern Static",
            "A Quiet Heist",
            "The Paper Crown",
            "Salt and Thunder",
            "The Long Detour",
            "Glass Orchard",
            "Midnight Ledger",
            "The Ninth Summer",
            "Copper Sky",
            "Echoes of Vane",
            "The Last Ferry",
            "Broken Compass",
            "Winter Arcade",
            "The Hollow Choir",
            "Neon Pastures",
            "Iron Lullaby",
            "The Second Tide",
        ],
        [
            "a three-hour drama whose second half drags",
            "a family animation that came out last spring",
            "a low-budget horror film with shaky camera work",
            "a romantic comedy set in Lisbon",
            "a thriller with a twist some viewers saw coming",
            "an action film I watched on a long flight",
            "a slow documentary about a fishing village",
            "a musical my friends argued about afterwards",
        ],
    ),
    "book": (
        [
            "The Cartographer's Debt",
            "Ash Over Lisbon",
            "Small Hours",
            "The Tin Philosopher",
            "River of Receipts",
            "A Map of Other Winters",
            "The Orchard Keeper's Son",
            "Borrowed Light",
            "The Brass Almanac",
            "Seven Empty Rooms",
            "The Patient Storm",
            "Letters to a Lighthouse",
            "Dust and Dividends",
            "The Quiet Algorithm",
            "Harbor of Crows",
            "The Unfinished Atlas",
            "Marrow Street",
            "The Clockmaker's Widow",
        ],
        [
            "a 700-page fantasy novel with a slow start",
            "a cookbook of recipes from northern Italy",
            "a mystery whose ending left me confused",
            "a memoir that critics called uneven",
            "a textbook-style history of shipping containers",
            "a debut novel with a lot of hype",
            "a short novel my book club picked this month",
            "a thriller I picked up at an airport",
        ],
    ),
    "restaurant": (
        [
            "Luna Trattoria",
            "The Rusty Spoon",
            "Casa Verde",
            "Blue Fin Sushi Bar",
            "The Corner Bistro",
            "Saffron House",
            "Oak and Ember",
            "Noodle Republic",
            "The Golden Ladle",
            "Pier 9 Grill",
            "Little Hanoi",
            "The Tipsy Radish",
            "Maison Perle",
            "Smoke Alley BBQ",
            "The Green Fork",
            "Taqueria El Sol",
            "The Copper Kettle",
            "Harbor Street Diner",
        ],
        [
            "a place where we waited forty minutes for a table",
            "a busy lunch spot near my office",
            "a family-run place that serves homemade pasta",
            "an expensive tasting menu for an anniversary",
            "a small cafe that opened last month downtown",
            "a new place that just changed its chef",
            "a takeout order that arrived late",
            "a brunch spot with a very loud dining room",
        ],
    ),
    "product": (
        [
            "the Zenith X2 headphones",
            "the BrewMaster 300 coffee maker",
            "the TrailLite backpack",
            "the Nimbus robot vacuum",
            "the PixelPro 7 phone",
            "the AeroDesk standing desk",
            "the FlexFit running shoes",
            "the GlowBeam desk lamp",
            "the ChefMate air fryer",
            "the SnapShot mini camera",
            "the CloudRest pillow",
            "the VoltGo e-scooter",
            "the AquaPure water bottle",
            "the TypeRight keyboard",
            "the SolarMax power bank",
            "the Breeze tower fan",
            "the KidSafe tablet",
            "the HomeHub smart speaker",
        ],
        [
            "something whose battery barely lasts a day",
            "something I have used every day for a month",
            "an item I returned once and then bought again",
            "a budget option I bought on sale",
            "something with an app that keeps asking for updates",
            "a gift that my partner uses daily",
            "something a friend recommended to me",
            "an upgrade from the model I had for five years",
        ],
    ),
}

TEMPLATES = [
    "Write a short review of {name}, {detail}.",
    "Give me a two-sentence review of {name}: {detail}.",
    "I recently came across {name}, {detail}. Write a quick review.",
    "Write a few honest lines reviewing {name}, {detail}.",
    "Review {name} in under fifty words. Context: {detail}.",
]


def prompts_for(kind: str, names: list[str]) -> list[str]:
    _, details = SUBJECTS[kind]
    return [t.format(name=n, detail=d) for n, d, t in product(names, details, TEMPLATES)]


def main() -> None:
    rng = random.Random(SEED)
    train, heldout = [], []
    for kind, (names, _) in SUBJECTS.items():
        names = list(names)
        rng.shuffle(names)
        # Held-out names first (4 of 18 per kind), the rest for training; sampling keeps each file mixed.
        heldout += rng.sample(prompts_for(kind, names[:4]), HELDOUT_PER_KIND)
        train += rng.sample(prompts_for(kind, names[4:]), TRAIN_PER_KIND)
    rng.shuffle(train)
    rng.shuffle(heldout)
    (HERE / "train_prompts.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (HERE / "heldout_prompts.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    print(f"{len(train)} training prompts, {len(heldout)} held-out prompts in {HERE}")


if __name__ == "__main__":
    main()
