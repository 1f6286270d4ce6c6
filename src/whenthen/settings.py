"""One Settings object, built once at the entrypoint and passed down.

Environment variables use the prefix ``WHENTHEN_`` and ``__`` for nesting, e.g.
``WHENTHEN_INGEST__MAX_BATCH_EVENTS=1000``. Nothing here reads the environment at
import time: call :func:`load_settings`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseModel):
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    max_nesting_depth: int = 32
    #: How far in the future a (skew-corrected) timestamp may lie before it is refused.
    max_future_seconds: int = 24 * 3600
    #: The oldest timestamp accepted (historical imports go back this far).
    min_timestamp_year: int = 2000
    #: Token bucket per workspace: sustained events per second and burst size.
    rate_limit_events_per_second: float = 20_000.0
    rate_limit_burst: int = 40_000


class PipelineSettings(BaseModel):
    #: Number of virtual partitions the event log is split into; fixed once data exists.
    partitions: int = 64
    #: How many pending events one claim takes from a partition. Small enough that a batch
    #: (one transaction) does not keep API writers waiting long on SQLite.
    batch_size: int = 100
    #: How many a group takes after one came back full (a backlog: a burst, or the log
    #: left while no worker ran), until one comes back short: each transaction's fixed
    #: costs (its commit's fsync, the workspace set-up, the reads of the batch's people)
    #: are shared by more events. Never fewer than ``batch_size``.
    backlog_batch_size: int = Field(default=400, ge=1)
    #: How long a partition lease lasts before another worker may take it over.
    lease_seconds: float = 30.0
    #: Idle poll interval of the background worker.
    poll_interval_seconds: float = 0.2
    #: Threads that fire journey timers at once when more than a batch (1,000) fall due
    #: together (PostgreSQL only: SQLite has one writer and always fires with one).
    timer_threads: int = Field(default=2, ge=1, le=16)

    @property
    def backlog_limit(self) -> int:
        """How many events a group takes after a full one: ``backlog_batch_size``, never
        fewer than ``batch_size``."""
        return max(self.batch_size, self.backlog_batch_size)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    #: Run the pipeline worker inside the API process (the embedded default).
    embedded_worker: bool = True


class EmailSettings(BaseModel):
    #: With no SMTP host, email is captured in the local mailbox (``whenthen mailbox``)
    #: and marked as not delivered.
    smtp_host: str | None = None
    smtp_port: int = 25
    #: none, starttls or tls (implicit TLS, usually port 465)
    smtp_security: str = "none"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_seconds: float = 10.0
    #: SMTP sessions kept open and used at once by a dispatcher. Each message takes two
    #: round trips to the server (one with PIPELINING for the envelope, one for the
    #: content): over a network, more sessions carry more messages a second.
    smtp_connections: int = Field(default=8, ge=1, le=64)
    #: A CA bundle (PEM) to verify the SMTP server's certificate with, e.g. a private CA.
    smtp_ca_file: str | None = None
    from_address: str = "whenthen <noreply@localhost>"
    max_attempts: int = 5


class WebhookSettings(BaseModel):
    #: Allow webhooks to private, loopback and link-local addresses (off: SSRF guard).
    allow_private_addresses: bool = False
    timeout_seconds: float = 10.0
    max_attempts: int = 5
    #: Signs webhook bodies. Unset: derived from ``secret_key`` (``whenthen config
    #: webhook-secret`` prints it), so receivers never hold the master secret.
    signing_secret: SecretStr | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WHENTHEN_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    database_url: str = "sqlite:///whenthen.db"
    #: SQLite's fsync policy. FULL makes a 200 from the tracking API survive power loss;
    #: NORMAL survives a crash of the process only (faster, see docs/benchmarks.md).
    sqlite_synchronous: str = "FULL"
    #: Secret for keyed hashes (erasure tombstones) and signatures. Change it in production.
    secret_key: SecretStr = SecretStr("dev-insecure-change-me")
    #: Create a demo workspace on ``serve`` when none exists.
    demo_workspace: bool = True
    #: The address people's mail clients reach this server at (tracking links, unsubscribe).
    public_url: str = "http://127.0.0.1:8000"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    email: EmailSettings = Field(default_factory=EmailSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)


def webhook_signing_secret(settings: Settings) -> bytes:
    """The key webhook receivers verify signatures with; never the master secret itself."""
    if settings.webhooks.signing_secret is not None:
        return settings.webhooks.signing_secret.get_secret_value().encode("utf-8")
    master = settings.secret_key.get_secret_value().encode("utf-8")
    return hmac.new(master, b"whenthen webhook signing", hashlib.sha256).hexdigest().encode("ascii")


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, with explicit overrides winning."""
    return Settings(**overrides)


REDACTED = "*" * 10


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration with secrets hidden, for ``whenthen config show``."""
    data = settings.model_dump(mode="json")
    data["secret_key"] = REDACTED
    if settings.email.smtp_password is not None:
        data["email"]["smtp_password"] = REDACTED
    if settings.webhooks.signing_secret is not None:
        data["webhooks"]["signing_secret"] = REDACTED
    url = settings.database_url
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            user = creds.split(":", 1)[0]
            data["database_url"] = f"{scheme}://{user}:****@{host}"
    return data
