"""The one settings object: pydantic-settings with the ``LORASWAP_`` prefix; CLI flags override."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from basemodel.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
Attention = Literal["auto", "sdpa", "xformers"]
TextEncoderDevice = Literal["cuda", "cpu", "offload"]

TokenList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every tunable of loraswap. Env: ``LORASWAP_<FIELD>``; lists are comma-separated."""

    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", validate_default=True)

    home: Path = Field(Path(".loraswap"), description="State directory: models, adapters, caches.")
    base_model: str = Field("tiny-sd", description="'tiny-sd', a diffusers folder or a .safetensors file.")
    base_components: Path | None = Field(
        None,
        description="A diffusers folder of the base model's family that supplies what a single-file SD3 "
        "or Flux checkpoint lacks (text encoders, tokenizers, VAE), as diffusers' from_pretrained(folder, "
        "transformer=...) does. See docs/models.md.",
    )
    device: Device = "auto"
    dtype: DType = "auto"
    attention: Attention = "auto"
    text_encoder_device: TextEncoderDevice = Field(
        "cuda",
        description="Where text encoders live: 'cuda' beside the denoiser, 'cpu' (run there), 'offload' "
        "(on the GPU only while encoding). See docs/operations.md.",
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    allow_unauthenticated: bool = Field(False, description="Allow a non-loopback bind without tokens.")
    generate_tokens: TokenList = Field(default_factory=list, description="Bearer tokens, scope 'generate'.")
    admin_tokens: TokenList = Field(
        default_factory=list, description="Bearer tokens, scope 'admin' (+generate)."
    )

    max_queue: int = Field(16, ge=1, le=10_000, description="Requests waiting for the worker before 429.")
    request_timeout_s: float = Field(300.0, gt=0, description="Queue wait + generation, then 504.")
    # Size and cost limits follow the loaded model unless set (service/engine/limits.py says why):
    max_width: int | None = Field(None, ge=8, le=16384, description="Widest output (None: 3 × native).")
    max_height: int | None = Field(None, ge=8, le=16384, description="Tallest output (None: 3 × native).")
    max_output_pixels: int | None = Field(
        None, ge=64, description="Most output pixels, width × height (None: 4 × native²)."
    )
    max_cost_pixel_steps: int | None = Field(
        None,
        ge=64,
        description="Most width × height × steps × num_images per request (None: 1200 × native²).",
    )
    max_steps: int = Field(150, ge=1, le=1000)
    max_images: int = Field(8, ge=1, le=64)
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="Request body limit, base64 images included (413 above)."
    )
    max_image_bytes: int = Field(8 << 20, ge=1024, description="Largest init/mask image file (422 above).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=64, description="Most pixels an input image may declare in its header (422 above)."
    )
    warmup: bool = Field(True, description="Run one tiny generation before reporting ready.")
    graceful_timeout_s: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    openai_data_urls: bool = Field(
        False,
        description="Answer response_format=url on /v1/images/generations with data: URLs (else 400).",
    )

    # --- Adapter registry (issue 3; owned by adapters/, see docs/adapters.md) ---
    store: str | None = Field(None, description="file:///abs/dir, a path or s3://bucket/prefix (None: home).")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (else boto3's AWS_ENDPOINT_URL).")
    max_adapter_bytes: int = Field(512 << 20, ge=1024, description="Largest adapter file accepted (413).")
    max_adapter_header_bytes: int = Field(1 << 20, ge=1024, le=100 << 20, description="Header cap.")
    max_lora_rank: int = Field(256, ge=1, le=4096, description="Highest LoRA rank accepted.")
    max_pictures: int = Field(8, ge=0, le=64, description="Pictures one adapter version may carry (422).")
    max_picture_bytes: int = Field(4 << 20, ge=1024, description="Largest picture file (422 above).")
    max_picture_pixels: int = Field(
        4096 * 4096, ge=64, description="Most pixels a picture may declare (read before decoding)."
    )
    strict_base: bool = Field(False, description="Refuse adapters not recorded against this exact base.")

    @field_validator("store", "s3_endpoint_url", "base_components", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("store")
    @classmethod
    def _store_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// store URIs need a bucket: s3://bucket/prefix")
        if value.startswith("file://") and not value.startswith("file:///"):
            raise ValueError("file:// store URIs must be absolute: file:///abs/dir")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("store must be a path, file:///abs/dir or s3://bucket/prefix")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("s3_endpoint_url must start with http:// or https://")
        return value

    @property
    def adapter_store_uri(self) -> str:
        """The adapter store URI in effect: ``store`` or ``<home>/adapters``."""
        return self.store or str((self.home / "adapters").expanduser().resolve())

    # --- end adapter registry ---

    # --- Store outages: bounded calls, circuit breaker, remembered resolutions (docs/reliability.md) ---
    store_connect_timeout_s: float = Field(2.0, gt=0, le=120, description="Connect timeout of a store call.")
    store_read_timeout_s: float = Field(
        5.0, gt=0, le=600, description="Timeout of one socket read of a store call (not of a whole download)."
    )
    store_max_attempts: int = Field(2, ge=1, le=10, description="Attempts per store call (retries + 1).")
    store_deadline_s: float = Field(
        3.0, gt=0, le=600, description="How long a request waits for store reads before 503."
    )
    store_breaker_failures: int = Field(
        3, ge=1, le=1000, description="Consecutive store failures that open the circuit breaker."
    )
    store_breaker_cooldown_s: float = Field(
        5.0, gt=0, le=3600, description="How long an open breaker fails fast before one probe call."
    )
    store_probe_interval_s: float = Field(
        1.0,
        ge=0.1,
        le=3600,
        description="While the breaker is open, one background probe of the store this often (so it "
        "closes within about this long of the store coming back).",
    )
    latest_ttl_s: float = Field(
        5.0, ge=0, le=86_400, description="How long a resolution of 'latest' is reused (0: every request)."
    )
    latest_stale_max_s: float = Field(
        3600.0, ge=0, le=30 * 86_400, description="How old a remembered 'latest' may be served in an outage."
    )
    embedding_list_ttl_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="How long the list of registered textual-inversion embeddings (the ids a prompt may "
        "name bare) is reused before it is listed again in the background.",
    )
    # --- end store outages ---

    # --- Hot-swap engine: adapter cache tiers and batching ---
    adapter_cache_device_mb: int = Field(1024, ge=1, description="Device tier (ready-to-run adapters).")
    adapter_cache_host_mb: int = Field(4096, ge=1, description="Host RAM tier (pinned on CUDA).")
    adapter_cache_disk_mb: int = Field(20480, ge=1, description="Local disk copies of remote blobs.")
    adapter_load_pool_mb: int = Field(
        256,
        ge=0,
        description="Free CPU memory kept for cold loads on a CPU model: the read buffers of evicted "
        "adapters are reused, so a cold load reads into memory already faulted in (0: off).",
    )
    adapter_cache_dir: Path | None = Field(
        None, description="Disk tier folder (default <home>/cache/adapters; one per Ray Serve replica)."
    )
    pinned_adapters: TokenList = Field(
        default_factory=list, description="Adapter refs loaded at start and never evicted (id or id@N)."
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Requests per denoising batch; default 4 on CUDA, 1 on CPU (batched results match "
        "the request served alone within 2/255 per pixel, not bit for bit).",
    )
    batch_window_ms: float = Field(5.0, ge=0, le=10_000, description="How long to gather a batch.")
    lora_path: Literal["auto", "hooked", "fused"] = Field(
        "auto",
        description="How a batch applies adapters: auto (fuse a uniform batch when it pays, docs/architecture"
        ".md), or force hooked / fused (mixed batches are always hooked).",
    )
    lora_fuse_budget_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="Memory for fused weights (one set; SD1.5's attention projections take 178 MiB in fp16); "
        "a set that does not fit runs hooked; 0 never fuses.",
    )

    # --- Jobs with progress (/v1/jobs, docs/api.md "Jobs") ---
    job_ttl_s: float = Field(600.0, gt=0, le=7 * 86_400, description="How long a finished job is kept.")
    max_jobs: int = Field(
        128, ge=1, le=100_000, description="Finished jobs kept (with their images); the oldest goes first."
    )
    job_heartbeat_s: float = Field(
        15.0, gt=0, le=300, description="Seconds between keep-alive comments on a quiet event stream."
    )
    # --- end jobs ---

    @field_validator("generate_tokens", "admin_tokens", "pinned_adapters", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("generate_tokens", "admin_tokens")
    @classmethod
    def _tokens_long_enough(cls, value: list[str]) -> list[str]:
        short = [t for t in value if len(t) < 16]
        if short:
            raise ValueError("bearer tokens must be at least 16 characters long")
        return value

    @model_validator(mode="after")
    def _refuse_open_bind(self) -> Settings:
        if not self.auth_enabled and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host!r} without bearer tokens: set "
                "LORASWAP_GENERATE_TOKENS / LORASWAP_ADMIN_TOKENS or pass --allow-unauthenticated"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.generate_tokens or self.admin_tokens)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env + overrides (CLI flags; ``None`` means 'not given').

    Raises ``ConfigError`` with every problem listed instead of pydantic's traceback.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(
            "invalid settings: " + "; ".join(problems),
            detail={"problems": problems},
            hint="Check the LORASWAP_* environment variables and command-line flags.",
        ) from None
