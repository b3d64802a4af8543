"""LoRA adapters as artifacts: safe reading, validation, normalisation, metadata and the registry."""
