"""On-policy (iterative) DPO: generate, judge, pair, train, evaluate, round after round (SPEC §6)."""
