"""Sequence packing with shared prompts and chunked log-probs: the fast `logps_fn` (SPEC §3.4)."""

from dpokit.packing.forward import build_logps_fn, packed_pair_logps

__all__ = ["build_logps_fn", "packed_pair_logps"]
