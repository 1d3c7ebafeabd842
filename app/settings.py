"""The one place configuration is read from the environment (prefix ``SAELAB_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

CommaList = Annotated[list[str], NoDecode]
"""A list read from the environment as comma-separated items."""


class Settings(BaseSettings):
    """Deployment settings; every field can be set as ``SAELAB_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="SAELAB_", env_file=None, extra="ignore")

    data_dir: Path = Path.home() / ".saelab"
    """Converted models, captures, SAEs and benchmark caches live here."""
    default_model: str = "smollm2-135m"
    """The model used when a command is not given --model."""
    database_url: str = ""
    """SQLAlchemy URL of the store; empty means the SQLite file ``<data_dir>/saelab.db``."""
    broker_url: str = ""
    """Celery broker, e.g. ``redis://host:6379/0``; empty means the serverless embedded one
    (kombu's SQLAlchemy transport on ``<data_dir>/broker.db``)."""
    heartbeat_s: float = 2.0
    """How often a running job's worker refreshes its heartbeat and checks for cancel."""
    stale_after_s: float = 60.0
    """A running job whose heartbeat is older than this lost its worker."""
    resend_after_s: float = 600.0
    """A job still queued this long after it was sent is sent again (its broker message may
    have been lost, e.g. Redis restarted without persistence); a duplicate is harmless:
    only one worker can claim the job."""
    max_attempts: int = 3
    """Runs of a job (the first and resumptions after lost workers) before it fails."""
    admin_token: str = Field("", repr=False)
    """When set, submitting and cancelling jobs (web and API) needs it: an
    ``Authorization: Bearer <token>`` header, or the cookie set by the explorer's sign-in."""
    signin_ttl_s: float = 12 * 3600.0
    """How long a sign-in lasts; changing the token ends every sign-in at once."""
    allowed_hosts: CommaList = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    """Host headers the explorer answers (others get 400: a page elsewhere cannot reach a
    loopback server through DNS rebinding); ``*`` answers any."""
    allowed_paths: CommaList = Field(default_factory=list)
    """Roots besides the data dir that job parameters may name (datasets, models,
    captures, SAEs)."""
    hub_access: bool = False
    """Let jobs submitted over the web name hub models and datasets (downloads)."""
    max_body_bytes: int = 1_000_000
    """Largest request body the explorer reads (413 beyond)."""
    explain_max_usd: float | None = None
    """Spend cap of one Claude/OpenAI explain job: it stops with a message when reached."""
    host: str = "127.0.0.1"
    """Where ``saelab serve`` listens."""
    port: int = 8000
    inference_models: int = 1
    """Language models kept loaded for probing and steering (least recently used goes)."""
    inference_saes: int = 4
    """SAEs kept loaded for probing and steering."""
    eval_records_gb: float = Field(4.0, ge=0)
    """Bound of ``<data_dir>/eval-records`` (the recorded clean passes later evaluations of
    the same text read; the records read longest ago go first); 0 keeps none."""

    anthropic_api_key: str = Field("", validation_alias=AliasChoices(
        "SAELAB_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"), repr=False)
    """When set, LLM explain jobs use Claude (``ANTHROPIC_API_KEY`` is read too); else an
    OpenAI-compatible server when ``openai_base_url`` is set, else the local instruct
    model."""
    anthropic_base_url: str = Field("", validation_alias=AliasChoices(
        "SAELAB_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"))
    """Another endpoint speaking the Messages API (a proxy or gateway); empty: Anthropic's."""
    claude_model: str = "claude-sonnet-4-6"
    """The Claude model explain jobs use unless a job names another."""
    openai_base_url: str = ""
    """An OpenAI-compatible server for ``--explainer openai`` (vLLM, Ollama, llama.cpp's
    server, LM Studio, OpenRouter), e.g. ``http://127.0.0.1:8080/v1``."""
    openai_api_key: str = Field("", repr=False)
    """Its API key (local servers usually take any)."""
    openai_model: str = ""
    """The model the server is asked for unless a job names another."""

    @field_validator("allowed_hosts", "allowed_paths", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def model_post_init(self, __context) -> None:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'saelab.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def jobs_dir(self) -> Path:
        """Where each job writes its artifacts, ``<jobs_dir>/<id>/``."""
        return self.data_dir / "jobs"

    @property
    def eval_records_dir(self) -> Path:
        """Where evaluations keep their recorded clean passes (``training.evaluation.
        records``), which later evaluations of the same text and block read."""
        return self.data_dir / "eval-records"

    @property
    def eval_records_bytes(self) -> int:
        return int(self.eval_records_gb * 2**30)


def get_settings() -> Settings:
    return Settings()
