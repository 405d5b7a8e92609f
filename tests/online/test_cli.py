"""`dpokit iterate` on the command line: bad configs fail with one line and exit code 2."""

from __future__ import annotations

import importlib

from typer.testing import CliRunner

from dpokit.cli import app


def test_iterate_bad_config_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "iterate.yaml"
    (tmp_path / "p.txt").write_text("Review a film.\n")
    path.write_text(
        f"prompts: {tmp_path / 'p.txt'}\neval_prompts: {tmp_path / 'p.txt'}\nsamples_per_prompt: 1\n"
    )
    result = CliRunner().invoke(app, ["iterate", str(path)])
    assert result.exit_code == 2
    assert "field 'samples_per_prompt'" in result.output
    result = CliRunner().invoke(app, ["iterate", str(path), "samples_per_prompt=2", "judge=nope"])
    assert result.exit_code == 2 and "unknown judge" in result.output
    result = CliRunner().invoke(app, ["iterate", str(path), "samples_per_prompt=2", "eval_prompts=none.txt"])
    assert result.exit_code == 2 and "none.txt: no such prompts file" in result.output
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_outside_training_steps_is_one_line_and_130(tmp_path, monkeypatch) -> None:
    """Ctrl-C while loading, in the reference pass, generating or judging (the training steps save a
    checkpoint and exit on their own): one line pointing to --resume, exit status 130, no traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "iterate.yaml"
    (tmp_path / "p.txt").write_text("Review a film.\n")
    path.write_text(f"prompts: {tmp_path / 'p.txt'}\neval_prompts: {tmp_path / 'p.txt'}\n")
    # by module object: `dpokit.train` names the API function, not the package
    monkeypatch.setattr(importlib.import_module("dpokit.online.loop"), "iterate", interrupted)
    monkeypatch.setattr(importlib.import_module("dpokit.train.loop"), "train", interrupted)
    for command in (["iterate", str(path)], ["train", "model=unused"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 130, result.output
        assert (
            result.output.strip() == "interrupted (Ctrl-C): what was finished is kept; continue with --resume"
        )
