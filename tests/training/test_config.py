"""TrainConfig: validation messages, TOML config file, CLI overrides, aliases, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import build_parser
from training.cli import resolve_config
from training.config import TrainConfig, build_config, load_config_file, to_toml
from training.errors import TrainConfigError
from training.export import finish_line


def parse(*argv: str) -> TrainConfig:
    return resolve_config(build_parser().parse_args(["train", *argv]))


def test_defaults_and_derived_values() -> None:
    config = build_config({"data": "d", "output": "o"})
    assert config.rank == 8 and config.lora_alpha == 8.0 and config.lora_scale == 1.0
    assert config.lr == 1e-4 and config.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.template == "{caption}"
    rs = build_config({"data": "d", "output": "o", "rank": 16, "alpha": 8, "rslora": True})
    assert rs.lora_scale == pytest.approx(8 / 4)
    assert (
        build_config({"data": "d", "output": "o", "trigger_word": "sks"}).template == "{trigger}, {caption}"
    )


def test_clear_validation_messages() -> None:
    with pytest.raises(TrainConfigError) as info:
        build_config({"data": "d", "rank": 0, "val_split": 1.5, "mixed_precision": "fp8"})
    message = info.value.message
    assert "output: required (--output" in message
    assert "rank: Input should be greater than or equal to 1" in message
    assert "val_split" in message and "mixed_precision" in message
    with pytest.raises(TrainConfigError, match="did you mean 'rank'"):
        build_config({"data": "d", "output": "o", "rnak": 4})
    with pytest.raises(TrainConfigError, match="either steps or epochs"):
        build_config({"data": "d", "output": "o", "steps": 1, "epochs": 1})
    with pytest.raises(TrainConfigError, match="register needs export"):
        build_config({"data": "d", "output": "o", "register": "x", "export": False})


def test_alpha_the_registry_would_refuse_fails_before_training() -> None:
    assert build_config({"data": "d", "output": "o", "rank": 4, "alpha": 256}).lora_scale == 64
    with pytest.raises(TrainConfigError, match="alpha <= 64 x rank"):
        build_config({"data": "d", "output": "o", "rank": 4, "alpha": 257})
    with pytest.raises(TrainConfigError, match="LoRA scale of 128"):  # rsLoRA: alpha / sqrt(rank)
        build_config({"data": "d", "output": "o", "rank": 4, "alpha": 256, "rslora": True})


def test_config_file_then_cli_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text(
        """
base_model = "tiny-sd"
data = "images"            # relative to this file
output = "runs/one"

[lora]
network_dim = 4            # kohya name
network-alpha = 2
target_modules = ["to_q", "to_v"]

[schedule]
learning_rate = 5e-4       # diffusers name
max_train_steps = 30
"""
    )
    from_file = parse("--config", str(toml))
    assert (
        from_file.rank == 4 and from_file.lora_alpha == 2.0 and from_file.lr == 5e-4 and from_file.steps == 30
    )
    assert from_file.data == tmp_path / "images" and from_file.output == tmp_path / "runs" / "one"
    assert from_file.target_modules == ["to_q", "to_v"]
    overridden = parse(
        "--config",
        str(toml),
        "--rank",
        "16",
        "--epochs",
        "2",
        "--target-modules",
        "to_k,to_out.0",
        "ff.net.2",
    )
    assert overridden.rank == 16 and overridden.alpha == 2  # alpha still from the file
    assert overridden.epochs == 2 and overridden.steps is None  # CLI epochs replaces file steps
    assert overridden.target_modules == ["to_k", "to_out.0", "ff.net.2"]
    assert parse("--config", str(toml), "--learning-rate", "1e-3").lr == 1e-3  # alias flag


def test_boolean_flags_and_cli_only_values(tmp_path: Path) -> None:
    config = parse(
        "--data", "d", "--output", "o", "--train-text-encoder", "--no-export", "--dry-run", "--dora"
    )
    assert config.train_text_encoder and not config.export and config.dry_run and config.dora
    assert "dry_run" not in config.hyperparameters() and "resume" not in config.hyperparameters()
    with pytest.raises(SystemExit):
        parse("--data", "d", "--output", "o", "--mixed-precision", "fp8")


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3")
    with pytest.raises(TrainConfigError, match="invalid TOML"):
        load_config_file(bad)
    with pytest.raises(TrainConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = build_config(
        {
            "data": str(tmp_path / "d"),
            "output": str(tmp_path / "o"),
            "rank": 4,
            "sample_prompts": ['a "quoted" cat'],
            "snr_gamma": 5,
        }
    )
    saved = tmp_path / "resolved.toml"
    saved.write_text(to_toml(config))
    assert build_config(load_config_file(saved)) == config


def _saved_run(output: Path, config: dict[str, object]) -> None:
    """A run folder whose latest checkpoint saved ``config`` (what ``Trainer`` writes in state.json)."""
    checkpoint = output / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 4, "config": config}))
    (output / "checkpoints" / "LATEST").write_text("step-00000004")


def test_resume_inherits_hyperparameters_not_actions(tmp_path: Path) -> None:
    """``--resume latest`` used to inherit ``--register`` from the saved config and register a new version
    unasked: the resumed run's hyperparameters carry over, its actions (register, store) do not."""
    out = tmp_path / "run"
    saved = build_config(
        {"data": "d", "output": str(out), "lr": 0.5, "rank": 4, "register_id": "ink", "store": "s3://b/p"}
    )
    _saved_run(out, saved.hyperparameters())
    resumed = parse("--output", str(out), "--resume", "latest")
    assert (resumed.lr, resumed.rank, str(resumed.data)) == (0.5, 4, "d")
    assert resumed.register_id is None and resumed.store is None
    line = finish_line(resumed, saved.hyperparameters())
    assert "nothing registered" in line and "--register ink" in line and "does not repeat" in line
    again = parse("--output", str(out), "--resume", "latest", "--register", "ink")
    assert again.register_id == "ink" and again.lr == 0.5
    assert "register it as the next version of 'ink'" in finish_line(again, saved.hyperparameters())
    assert finish_line(build_config({"data": "d", "output": "o", "export": False})).startswith(
        "on finish: no export"
    )
