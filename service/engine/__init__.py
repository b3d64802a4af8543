"""Inference engine: the resident pipeline, the sampling loop and the single worker that owns them."""
