"""Per-request LoRA on a resident model (vLLM's ``vllm/lora`` layout).

- ``request.py``: what a request asks for (``AdapterRequest``) and what it resolved to.
- ``layers/``: one file per layer kind; each computes a LoRA delta for its module type.
- ``model_manager.py``: injects forward hooks into every targetable module once, and activates a set
  of adapters (with per-row scales for mixed batches) for exactly one forward pass scope.
- ``weights.py``: an adapter's tensors arranged per module on the device, ready to run.
- ``cache.py``: the tiered LRU cache (device, host, disk) with byte budgets, pins and single-flight
  loads.
- ``resolver.py``: adapter references → immutable versions, noticing new versions in the store.
- ``embeddings.py``: which registered ids are textual-inversion embeddings, and which a prompt names.
"""
