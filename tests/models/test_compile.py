"""`compile: true`: each decoder layer compiled in place, and training on it equal to eager training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.models.loading import add_lora, compile_layers, load_model
from dpokit.train.loop import train
from tiny_models import tiny_run_config


def test_every_decoder_layer_is_compiled_and_nothing_else(tiny_model_dir) -> None:
    model = add_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, "all-linear", False)
    compile_layers(model)
    layers = model.get_base_model().model.layers
    assert len(layers) > 0 and all(layer._compiled_call_impl is not None for layer in layers)
    assert model.get_base_model()._compiled_call_impl is None


def test_a_model_without_decoder_layers_is_refused() -> None:
    class NoLayers(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(DpokitError, match="compile: NoLayers has no list of decoder layers"):
        compile_layers(NoLayers())


def train_losses(tiny_model_dir, standard_file, tmp_path, compile: bool) -> list[float]:
    config = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        standard_file,
        max_steps=3,
        compile=compile,
        output_dir=str(tmp_path / f"compile-{compile}"),
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / f"compile-{compile}" / "metrics.jsonl").open()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.slow  # compiling takes about two minutes on two cores
def test_compiled_training_equals_eager(tiny_model_dir, standard_file, tmp_path) -> None:
    """Fused kernels round differently from eager ones (1e-5 on log-probs here); the losses agree well inside
    that, and the first is ln 2 because the reference was computed by the same compiled layers."""
    eager = train_losses(tiny_model_dir, standard_file, tmp_path, compile=False)
    compiled = train_losses(tiny_model_dir, standard_file, tmp_path, compile=True)
    assert compiled[0] == pytest.approx(math.log(2), abs=1e-6)
    assert compiled == pytest.approx(eager, abs=1e-4)
