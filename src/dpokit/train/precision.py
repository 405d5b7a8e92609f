"""Numeric precision of a run, decided in one place (SPEC §9).

A `Precision` says in which dtype trainable and frozen weights are stored, gives the autocast context the
forward passes run under, and the gradient scaler fp16 needs. `setup_run` resolves the config's
`precision` once against the device; everything else asks the resulting object.

Why mixed and not a plain cast: AdamW's first update is lr * sign(g), 1e-6 at DPO's full fine-tuning rate,
while bf16 resolves only ~1/256 of a weight's magnitude (4e-5 for a weight of 1e-2). Stepped on bf16
weights, such updates round away; on fp32 master weights they land, and autocast still runs the matmuls
in bf16.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.logprobs import LogpsFn, PairLogps

COMPUTE_DTYPES = {
    "fp32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "fp16-mixed": torch.float16,
    "bf16-pure": torch.bfloat16,
}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (never "auto") on one device type ("cpu" or "cuda")."""

    name: str
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.name.endswith("-mixed")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in."""
        return COMPUTE_DTYPES[self.name]

    @property
    def trainable_dtype(self) -> torch.dtype:
        """Storage of trained weights (and so of AdamW's state): fp32 except under bf16-pure."""
        return torch.bfloat16 if self.name == "bf16-pure" else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Storage of weights that never step (separate reference, LoRA base): the compute dtype, since
        autocast would round them to it in every matmul anyway."""
        return self.compute_dtype

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward passes run inside this: autocast to the compute dtype under a mixed precision, nothing
        otherwise (fp32 needs none; bf16-pure weights are bf16 already)."""
        with torch.autocast(self.device_type, dtype=self.compute_dtype, enabled=self.mixed):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's narrow range flushes small gradients to zero unless the loss is scaled up first; bf16 has
        fp32's range and needs no scaler."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16-mixed" else None

    def wrap(self, logps_fn: LogpsFn) -> LogpsFn:
        """`logps_fn` run under `autocast()`: the training forward, the reference pass and held-out
        evaluation all call the run's log-prob function, so all of them run in this precision. Log-probs
        come out float32 whatever the compute dtype (the log-prob code reduces in float32)."""

        def logps_in_precision(model: torch.nn.Module, pairs: list) -> PairLogps:
            with self.autocast():
                return logps_fn(model, pairs)

        return logps_in_precision


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The config's `precision` on `device`: "auto" is bf16-mixed on a CUDA GPU with bf16, fp32 otherwise.

    Also turns TF32 on for the fp32 matmuls left (the fp32 precision itself, the LM head of the chunked
    log-probs): on GPUs without TF32 the flags do nothing.
    """
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16-mixed" if cuda_bf16 else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = Precision(name, device.type)
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision.compute_dtype)
    if device.type == "cpu" and half and not cpu_has_half_matmuls(half):
        warnings.warn(
            f"precision: {name} on a CPU without {half} matrix instructions: its {half} matmuls run in a slow "
            "fallback (a 512x2048 by 2048x2048 bf16 product took 39 s against 0.12 s in fp32 on a 2-core AVX2 "
            "machine); use precision: fp32 (the CPU default)",
            UserWarning,
            stacklevel=2,
        )
    return precision


# /proc/cpuinfo flags of the x86 and Arm instructions that run bf16 / fp16 matrix products natively.
HALF_MATMUL_FLAGS = {
    "bf16": {"avx512_bf16", "amx_bf16", "bf16"},
    "fp16": {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"},
}


def cpu_has_half_matmuls(kind: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has instructions for `kind` ("bf16" or "fp16") matrix products; True when unknown
    (no /proc/cpuinfo), so that nothing warns without evidence."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True
    flags = {
        flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()
    }
    return bool(flags & HALF_MATMUL_FLAGS[kind])
