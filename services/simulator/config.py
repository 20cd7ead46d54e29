"""Simulator settings: ``SWITCHBOARD_SIMULATOR_*`` environment variables.

Its own prefix, not ``CommonSettings``: the simulator stands in for an external provider, so it
needs none of the fleet's Kafka or Redis settings and must not be configured by them by accident.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SWITCHBOARD_SIMULATOR_"


class SimulatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Bind address of the simulator.")
    port: int = Field(
        default=8090, ge=0, le=65535, description="Port of the simulator (0: any free port)."
    )
    latency_scale: float = Field(
        default=1.0,
        ge=0,
        description="Multiplies every simulated delay (tests use ~0.01; 0 answers at once).",
    )
    profiles_file: Path | None = Field(
        default=None,
        description="YAML `profiles: {name: {ttft_s: ..., ...}}` adding or overriding profiles.",
    )
    seed: int = Field(default=0, description="Seed of the random fault rates and latency jitter.")
