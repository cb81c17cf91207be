"""Process settings, read from the environment (``RECLOOP_*``) by pydantic-settings.

Build a ``Settings`` once at a process's entry point and pass it down; nothing here is
read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from recloop.core.topics import Topics


def default_home() -> Path:
    """Where recloop keeps local state (broker data, snapshots, SQLite) unless told otherwise."""
    return Path.home() / ".cache" / "recloop"


class Settings(BaseSettings):
    """Settings every recloop process shares."""

    model_config = SettingsConfigDict(env_prefix="RECLOOP_", extra="ignore", frozen=True)

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    topic_prefix: str = Field(default="", description="prepended to every topic name")
    partitions: int = Field(default=4, ge=1, description="partitions of every per-user topic")
    replication_factor: int = Field(default=1, ge=1)
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("RECLOOP_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; empty means a SQLite file under home",
    )
    home: Path = Field(default_factory=default_home)
    snapshot_dir: Path | None = None
    snapshot_key: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key the learner signs snapshot announcements with and every "
        "reader checks them against (recloop.core.snapshot_auth); unset: not authenticated",
    )
    snapshot_max_weights_bytes: int = Field(
        default=1 << 30, ge=1, description="largest weights.safetensors a reader accepts"
    )
    catalogue_wait_s: float = Field(
        default=120.0, gt=0, description="how long a process waits for the first complete "
        "catalogue on the items and catalogue topics before it gives up"
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables the endpoint")
    metrics_host: str = "127.0.0.1"

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'recloop.db'}"

    @property
    def resolved_snapshot_dir(self) -> Path:
        return self.snapshot_dir or (self.home / "snapshots")

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka-style client options (confluent-kafka).

        Nagle's algorithm is off: a request and its slate are a few hundred bytes each, and
        holding a small segment for the previous one's ACK only adds latency (batching is
        librdkafka's job, ``linger.ms``)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
            "socket.nagle.disable": True,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            conf["sasl.password"] = self.kafka_sasl_password or ""
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        return conf
