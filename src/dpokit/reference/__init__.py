"""Reference log-probs: precomputed once, cached on disk under a key of everything that changes them."""
