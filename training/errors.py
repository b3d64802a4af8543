"""Training-specific errors, all inside the shared ``basemodel.errors`` hierarchy."""

from __future__ import annotations

from basemodel.errors import ConfigError, Incompatible, LoraswapError, NotFound, ValidationFailed


class DatasetError(ValidationFailed):
    """The dataset folder cannot be used (missing, empty, nothing readable)."""

    type = "dataset_error"
    hint = "Point --data at a folder of images with same-name .txt/.caption files or a metadata.jsonl."


class SynthOutputError(DatasetError):
    """``loraswap data synth`` was pointed at a folder that already holds a dataset."""

    hint = "Pick an empty output folder, or pass --overwrite to delete the dataset files in it first."


class TrainConfigError(ConfigError):
    """Training options that are invalid or cannot work together."""

    type = "train_config_error"
    hint = "Fix the option named in the message (command line or --config file) and retry."


class CheckpointError(Incompatible):
    """A checkpoint that is missing, incomplete or does not match this run."""

    type = "checkpoint_error"
    hint = "Pass --resume latest, a checkpoint folder under <output>/checkpoints, or start without --resume."


class CheckpointNotFound(NotFound):
    type = "checkpoint_not_found"
    hint = "List <output>/checkpoints; --resume latest uses the newest complete checkpoint."


class TrainingDiverged(LoraswapError):
    """The loss became NaN or infinite."""

    type = "training_diverged"
    hint = "Lower --lr, add --lr-warmup-steps or train in fp32 (--mixed-precision no), then resume."
