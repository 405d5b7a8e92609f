"""bf16/fp16 precisions on a CPU without half-precision matrix instructions warn and name the fix."""

from __future__ import annotations

import pytest
import torch

from dpokit.train import precision as precision_module
from dpokit.train.precision import cpu_has_half_matmuls, resolve_precision

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
GRAVITON3 = "Features\t: fp asimd asimdhp bf16 sve\n"


@pytest.mark.parametrize(
    "cpuinfo, bf16, fp16", [(AVX2_ONLY, False, False), (SAPPHIRE_RAPIDS, True, True), (GRAVITON3, True, True)]
)
def test_flags_are_read_from_cpuinfo(tmp_path, cpuinfo, bf16, fp16):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_half_matmuls("bf16", path) is bf16
    assert cpu_has_half_matmuls("fp16", path) is fp16


def test_unknown_cpus_do_not_warn(tmp_path):
    assert cpu_has_half_matmuls("bf16", tmp_path / "missing")


def test_bf16_mixed_on_an_avx2_cpu_warns_and_fp32_does_not(monkeypatch, recwarn):
    monkeypatch.setattr(precision_module, "cpu_has_half_matmuls", lambda kind: False)
    with pytest.warns(
        UserWarning, match="bf16-mixed on a CPU without bf16 matrix instructions.*use precision: fp32"
    ):
        resolve_precision("bf16-mixed", torch.device("cpu"))
    recwarn.clear()
    resolve_precision("fp32", torch.device("cpu"))
    resolve_precision("auto", torch.device("cpu"))
    assert not [w for w in recwarn.list if "matrix instructions" in str(w.message)]
