"""loraswap's trainer: a folder of captioned images in, a served-ready LoRA adapter out.

Roles, one per module: ``config`` (the validated ``TrainConfig``), ``data/`` (scan, prepare, synth,
cache), ``lora`` (injection and adapter state), ``loop`` (the optimisation loop), ``checkpoint``
(pickle-free save/resume), ``evaluate`` (validation loss, samples, similarity), ``export``
(adapter file + registration) and ``cli`` (``loraswap train`` / ``loraswap data``).
"""

TRAINER_NAME = "loraswap-trainer"
TRAINER_VERSION = "0.1.0"
