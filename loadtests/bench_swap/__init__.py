"""Hot-swap benchmark (issue 4): our LoRA engine against plain diffusers, same model, same files, one run.

Not a test. It prints a table and writes everything it measured (raw samples included) to
``loadtests/results/bench_swap-<shape>-<device>[-quick].json``::

    python -m loadtests.bench_swap --shape tiny|sd15|sdxl|sd3|flux|tiny-sdxl|tiny-sd3|tiny-flux
        [--device cpu|cuda] [--adapters N] [--quick] [--only PHASES] [--set SIZE=VALUE] [--model-cache DIR]

Shapes:

* ``tiny``: the embedded tiny-sd (``basemodel.tiny.build_tiny_pipeline()``), rank-4 attention LoRAs.
* ``sd15``: SD1.5-shaped, random-init pipeline built from the shipped configs in
  ``basemodel/configs/sd15`` (UNet ~860M parameters, the full CLIP ViT-L text encoder, the SD VAE; no
  weights downloaded), rank-16 attention LoRAs.
* ``sdxl``: SDXL-shaped, random-init ``StableDiffusionXLPipeline`` from ``basemodel/configs/sdxl`` (UNet
  2.6 B parameters, CLIP ViT-L + OpenCLIP ViT-bigG-shaped text encoders, the SDXL VAE), rank-16
  attention LoRAs (23 M parameters, 46 MB fp16 files); built in place and cached in fp16 (``sdxl.py``
  says how). ``tiny-sdxl``: the same code path on tiny-sdxl-random's shape.
* ``flux``: a ``FluxPipeline`` whose transformer has FLUX.1-dev's widths with 2 double + 4 single blocks
  (1.3 B parameters); ``sd3``: SD3.5 medium's transformer at full depth (2.2 B); rank-16 LoRAs on every
  attention and MLP Linear (``config.LORA_TARGETS``); ``tiny-flux`` / ``tiny-sd3`` for the tests
  (``mmdit.py`` says how they are built). Their default phases are cold, switch and request (on the
  fused path); the other phases call ``pipe.unet``.

Adapters: peft lays them out (``inject_adapter_in_model(LoraConfig(r, lora_alpha=r, target_modules=
[to_q, to_k, to_v, to_out.0], init_lora_weights=False))`` on a meta-device copy of the UNet, then
``get_peft_model_state_dict``); each adapter's values are drawn, seeded, from the distribution that
``init_lora_weights=False`` leaves (``nn.Linear``'s default init, so B is nonzero). Keys are prefixed
``unet.`` and saved with safetensors (fp16 by default) — the diffusers/PEFT layout with alpha = rank. The
same files are registered in a local store for our engine and loaded from disk by diffusers.

What is measured (after a warm-up; times are medians of repeats; where ours and a baseline are compared
they run back to back in alternating order, and the ratio is the median of the per-round ratios, so a
load swing on a shared machine hits both sides of a ratio alike):

1. cold load, local disk → ready to run. Ours = ``AdapterCache.load_blocking`` with the device and host
   tiers empty (store read + sha256 + header check + parse + ``check_canonical`` + ``DeviceAdapter.build``),
   with a per-step breakdown. Baseline = ``pipe.load_lora_weights(file)`` + ``pipe.unload_lora_weights()``;
   ``hotswap=True`` into a loaded slot is reported as well. References: ``Path.read_bytes`` and
   ``read_bytes`` + ``safetensors.torch.load``. The files are in the page cache (warm reads).
2./3. warm switch with 1…64 adapters resident. Ours = entering and leaving
   ``LoRAModelManager.activate([ActiveLoRA(adapter, 1.0)])`` for another resident adapter, and the full
   request-path version ``await cache.acquire`` + activate + ``cache.release``. Baseline =
   ``pipe.set_adapters([name], [1.0])`` with that many adapters loaded.
   unet_step: one CFG-shaped UNet forward with the adapter through our hooks and through diffusers' peft
   layers (same file; outputs compared) vs the base forward.
4. per-request latency through ``sample_batch`` (the server's request path), with one adapter vs none,
   and (tiny) vs the base request with our hooks removed.
5. 8 requests with 8 different adapters: one mixed ``sample_batch`` vs 8 sequential calls.
6. process RSS (and CUDA memory) before/after many swaps over 50 adapters with a device tier of 8.
7. ``paths`` (issue 13): a request on each LoRA path (none, fused, hooked), idle-hook cost, fuse +
   restore vs ``fuse_lora`` + ``unfuse_lora``, a Zipf(1.1) stream with the policy auto / hooked / fused,
   a mixed vs a uniform batch of 8.
8. ``preload``: ``POST /v1/adapters/{id}/preload`` over loopback HTTP (cold and resident) vs
   ``load_lora_weights`` + ``unload_lora_weights``.

On CPU the run uses one torch thread unless ``--threads`` says otherwise (see ``--help``).
"""


# Layout: ``cli`` (arguments, the run, the JSON), ``config`` (sizes per shape), ``fixtures`` (pipeline,
# adapter files, the shared ``Bench`` state), ``sdxl`` (the SDXL-shaped random pipelines), ``mmdit`` (the
# Flux- and SD3-shaped ones), one module
# per phase (``cold``, ``switch``, ``unet_step``, ``request``, ``mixed``, ``memory``), ``timing`` (the
# measuring helpers every phase uses), ``report`` (the table and its targets) and ``machine`` (load
# average, RSS, logging).

SUMMARY = (__doc__ or "").split("\n")[0]  # the first line: ``--help``'s description
