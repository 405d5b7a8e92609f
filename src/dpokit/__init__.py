"""dpokit: fast, guarded Direct Preference Optimization for causal language models.

The public API (everything else is private and may change):

    import dpokit
    config = dpokit.RunConfig(model="./sft-model", eval_data=None, sample_prompts=None)
    result = dpokit.train(config, train_data=my_dataset, quiet=True)   # -> dpokit.TrainResult
    dpokit.evaluate(result.model_dir, "heldout.jsonl", reference="./sft-model")
    dpokit.audit("pairs.jsonl"), dpokit.doctor(result.run_dir)          # -> [dpokit.Finding, ...]
    dpokit.RunConfig.from_trl(dpo_config, model="./sft-model")          # a TRL DPOConfig, mapped
    dpokit.iterate("examples/sentiment/config.yaml")                    # on-policy rounds -> IterateResult
"""

# The modules dpokit.train (the loop) and dpokit.evaluate (the metrics engine) are imported first, so that
# the names `dpokit.train` and `dpokit.evaluate` are then bound to the functions below for good: a later
# `import dpokit.train.loop` finds the module in sys.modules and leaves the name alone.
import dpokit.evaluate as _evaluate_module  # noqa: F401
import dpokit.train as _train_package  # noqa: F401
from dpokit.api import IterateResult, TrainResult, audit, doctor, evaluate, iterate, load_pairs, train
from dpokit.config import RunConfig
from dpokit.diagnostics.findings import Finding
from dpokit.errors import DpokitError
from dpokit.logprobs import PairLogps
from dpokit.losses import (
    LOSSES,
    LossParams,
    conservative,
    hinge,
    ipo,
    rdpo,
    robust,
    sigmoid,
    sigmoid_norm,
    simpo,
)
from dpokit.online.config import IterateConfig

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "DpokitError",
    "Finding",
    "IterateConfig",
    "IterateResult",
    "LossParams",
    "PairLogps",
    "RunConfig",
    "TrainResult",
    "audit",
    "conservative",
    "doctor",
    "evaluate",
    "hinge",
    "ipo",
    "iterate",
    "load_pairs",
    "rdpo",
    "robust",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "train",
]
