"""Rule-based judges that score generated text without a model."""

from __future__ import annotations

from functools import cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@cache
def _vader() -> SentimentIntensityAnalyzer:
    # Building the analyzer parses the bundled lexicon files; do it once per process.
    return SentimentIntensityAnalyzer()


def vader_score(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (-1 most negative, +1 most positive).

    This is the reward of controlled sentiment generation (Rafailov et al. 2023, section 6), with
    the rule-based VADER scorer standing in for the paper's trained sentiment classifier.
    """
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]
