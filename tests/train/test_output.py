"""save_final: a second save over an existing `final` replaces it whole and leaves nothing stale."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dpokit.models.loading import load_model, load_tokenizer
from dpokit.train.output import save_final


def test_save_final_replaces_an_existing_model_and_prunes_what_a_kill_left(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    out = tmp_path / "final"
    save_final(model, tokenizer, out)
    (tmp_path / ".partial-final").mkdir()  # a kill during an earlier save...
    (tmp_path / ".partial-final" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".previous-final").mkdir()  # ... and one between replace_dir's two renames
    name = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(0.25)
    assert save_final(model, tokenizer, out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights[name], torch.full_like(weights[name], 0.25))
    assert (out / "tokenizer.json").exists()
