"""Every setting of cacheproxy, in one place.

Read from (highest first): constructor arguments (the CLI's flags), environment variables
`CACHEPROXY_*`, a `.env` file, and the TOML file named by `CACHEPROXY_CONFIG` (default
`cacheproxy.toml` in the working directory, when present).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.cache/cacheproxy"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CACHEPROXY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_nested_delimiter="__",
    )

    # --- serving -------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Hugging Face folder or hub id; unset serves the built-in tiny model.",
    )
    served_model_name: str | None = Field(default=None, description="Name clients use; default: model.")
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = DEFAULT_DATA_DIR
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0

    # --- engine --------------------------------------------------------------------------
    block_size: int = Field(default=16, ge=1, le=256)
    max_model_len: int | None = Field(default=None, description="Cap on prompt + generated tokens.")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences decoded together.")
    max_num_batched_tokens: int = Field(
        default=2048, ge=16, description="Tokens of one step; longer prompts prefill in chunks."
    )
    load_format: Literal["safetensors", "dummy"] = Field(
        default="safetensors",
        description="dummy: random weights of the config's shape (benchmarks without a download).",
    )
    gpu_memory_utilization: float = Field(default=0.90, gt=0.0, le=1.0)
    kv_cache_bytes: int | None = Field(default=None, description="Cap on the engine's KV pool.")
    num_kv_blocks: int | None = Field(default=None, description="Exact pool size (overrides bytes).")
    cuda_graphs: bool = True
    layerwise_loads: bool = Field(
        default=True,
        description="On CUDA, a prefix found in the CPU tier loads layer by layer while the forward pass "
        "runs (each layer's attention waits for its own blocks); off: the step waits for every block.",
    )

    # --- cache ---------------------------------------------------------------------------
    cache_scope: Literal["tenant", "global"] = "tenant"
    cache_policy: Literal["write_back", "write_through"] = "write_back"
    sampling_defaults: Literal["model", "openai"] = Field(
        default="model",
        description="What a request that leaves temperature, top_p or top_k unset gets: the model's "
        "generation_config.json values (model, as vLLM does) or OpenAI's (temperature 1, top_p 1, no top_k).",
    )
    hash_seed: int = Field(default=0, description="Deployment secret seed of the block hashes.")
    cpu_cache_bytes: int = Field(default=2 << 30, ge=0)
    disk_cache_enabled: bool = True
    disk_cache_bytes: int = Field(default=16 << 30, ge=1 << 20, description="LMDB map_size.")
    disk_write_queue: int = Field(default=1024, ge=1)
    disk_cache_fill: float = Field(
        default=0.9, gt=0.0, lt=1.0, description="Share of the LMDB map filled before evicting."
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:6379/0, or redis+cluster://host:7000 for a Redis Cluster."
    )
    redis_ttl_s: int = Field(default=24 * 3600, ge=1)
    redis_max_bytes: int = Field(default=8 << 30, ge=0)
    redis_timeout_s: float = Field(default=0.25, gt=0)
    redis_max_entry_bytes: int = Field(default=32 << 20, ge=1, description="Larger blocks are not sent.")
    redis_write_queue: int = Field(default=1024, ge=1)
    redis_key_prefix: str = "cacheproxy:kv:"
    redis_breaker_failures: int = Field(default=3, ge=1, description="Failures in a row that open the breaker.")
    redis_breaker_cooldown_s: float = Field(default=5.0, gt=0, description="Seconds the tier is skipped.")
    cost_model: bool = Field(
        default=True, description="Plan each prefix: load it, recompute it, or recompute its head while the rest loads."
    )

    # --- server --------------------------------------------------------------------------
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant. Empty: any key, one tenant."
    )
    admin_key: str | None = None
    max_waiting_requests: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    default_max_tokens: int = Field(default=256, ge=1)
    records_file: str = "records.jsonl"
    reasoning_parser: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: a model whose chat template writes <think> blocks gets them back as "
        "reasoning_content (the Responses API: a reasoning item); none: all text is content.",
    )  # fmt: skip
    responses_store_bytes: int = Field(
        default=64 << 20, ge=0,
        description="Memory for Responses API responses kept for previous_response_id (oldest dropped first); "
        "0: none kept.",
    )  # fmt: skip

    tokenized_prompts_bytes: int = Field(
        default=128 << 20, ge=0,
        description="Memory for recent chat prompts' token ids (per cache namespace): a prompt that extends "
        "one is tokenized only from where they part. 0: every prompt tokenized whole.",
    )  # fmt: skip

    # --- router (`cacheproxy route`) ------------------------------------------------------------
    router_backends: list[str] = Field(default_factory=list, description="Replica base URLs.")
    router_policy: Literal["affinity", "round_robin"] = "affinity"
    router_prefix_bytes: int = Field(
        default=4096, ge=64, description="Leading bytes of the conversation hashed for affinity."
    )
    router_virtual_nodes: int = Field(default=64, ge=1, description="Points per replica on the hash ring.")
    router_max_in_flight: int = Field(default=32, ge=1, description="Per replica, before the next is tried.")
    router_health_interval_s: float = Field(default=2.0, gt=0)
    router_upstream_timeout_s: float = Field(default=600.0, gt=0)

    # --- logging -------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool | None = Field(default=None, description="JSON logs; default: when not a TTY.")

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(os.path.expanduser(str(v)))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("CACHEPROXY_CONFIG", "cacheproxy.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        sources.append(file_secret_settings)
        return tuple(sources)

    @property
    def records_path(self) -> Path:
        return self.data_dir / self.records_file
