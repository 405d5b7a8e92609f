"""The VADER judge: compound sentiment in [-1, 1], positive text above negative text."""

from dpokit.judges import vader_score


def test_vader_orders_sentiment_and_is_bounded():
    positive, neutral, negative = vader_score(
        [
            "A wonderful, delightful film. I loved it!",
            "The film is 90 minutes long.",
            "Awful, boring and terrible.",
        ]
    )
    assert positive > 0.5 and negative < -0.5 and neutral == 0.0
    assert all(-1.0 <= score <= 1.0 for score in (positive, neutral, negative))
