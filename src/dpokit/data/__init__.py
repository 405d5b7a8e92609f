"""Preference data: reading files, validating rows, TRL-identical tokenization, batching."""
