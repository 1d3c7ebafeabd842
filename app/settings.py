"""The one place configuration is read from the environment (prefix ``SAELAB_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment settings; every field can be set as ``SAELAB_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="SAELAB_", env_file=None, extra="ignore")

    data_dir: Path = Path.home() / ".saelab"
    """Converted models, captures, SAEs and benchmark caches live here."""
    default_model: str = "smollm2-135m"
    """The model used when a command is not given --model."""
    database_url: str = ""
    """SQLAlchemy URL of the store; empty means the SQLite file ``<data_dir>/saelab.db``."""

    def model_post_init(self, __context) -> None:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'saelab.db'}"


def get_settings() -> Settings:
    return Settings()
