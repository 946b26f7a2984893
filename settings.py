"""One settings object for the whole app: env vars prefixed ``LOUPE_``.

Only ``main()`` and CLI entry points build it; everything else receives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # populate_by_name: Settings(database_url=...) must work in code too, not only the env aliases.
    model_config = SettingsConfigDict(env_prefix="LOUPE_", extra="ignore", populate_by_name=True)

    # --- model -------------------------------------------------------------
    model_path: Path | None = Field(
        default=None, description="Your fastai export.pkl; unset serves the embedded demo model."
    )
    model_sha256: str | None = Field(
        default=None,
        description="sha256 the model file must have. Loading unpickles, i.e. runs code: "
        "a file that does not match is refused.",
    )
    model_name: str | None = Field(default=None, description="Shown in the UI; defaults to the file name.")
    backend: Literal["auto", "onnx", "torch"] = "auto"
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="Threads of a forward pass that runs alone (one request in flight); default "
        "every core. Set 1 on a box other programs keep busy (2 threads there were measured slower than 1)."
    )
    top_k: int = Field(default=5, ge=1)

    # --- serving -----------------------------------------------------------
    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("LOUPE_HOST", "GRADIO_SERVER_NAME"))
    port: int = Field(default=7860, validation_alias=AliasChoices("LOUPE_PORT", "GRADIO_SERVER_PORT"))
    max_upload_mb: float = Field(default=10.0, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0, description="Images whose header says more are refused.")
    model_workers: int | None = Field(
        default=None, ge=1, description="Model batches that run side by side under load, each on "
        "intra_op_threads // model_workers threads (at least 1); default one per core. Set it in containers with "
        "a CPU quota (the core count seen is the host's)."
    )
    max_batch_size: int = Field(default=8, ge=1)
    queue_max_size: int = Field(default=16, ge=1, description="Requests waiting beyond this get 'busy'.")
    stream_every: float = Field(default=0.5, gt=0)
    stream_time_limit: float = Field(default=60.0, gt=0)

    # --- storage -----------------------------------------------------------
    data_dir: Path = Path("data")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LOUPE_DATABASE_URL", "DATABASE_URL"),
        description="Any SQLAlchemy URL; default SQLite under data_dir.",
    )
    store_uploads: bool = True
    retention_days: int | None = Field(default=None, ge=1)
    stream_log_every: int = Field(default=10, ge=1, description="Log one live-stream frame in N.")
    log_queue_size: int = Field(
        default=256, ge=1, description="Predictions waiting for the background writer before callers wait."
    )
    log_block_s: float = Field(
        default=5.0, ge=0, description="How long a caller waits for room in a full log queue before the record "
        "is dropped (logged as an error and counted)."
    )

    # --- review ------------------------------------------------------------
    audit_rate: float = Field(default=0.02, ge=0, le=1)
    low_confidence: float = Field(default=0.6, ge=0, le=1)
    low_margin: float = Field(default=0.2, ge=0, le=1)
    high_loss: float = Field(default=1.0, ge=0, description="Cross-entropy above which a labelled item is queued.")
    second_opinion_rate: float = Field(default=0.0, ge=0, le=1)
    claim_lease_s: float = Field(default=300.0, gt=0)
    reviewers: str = Field(default="", description="'name:pbkdf2-hash,...' (see `python -m review hash-password`).")
    hf_allowlist: str = Field(default="", description="HF usernames allowed to review, comma-separated.")
    space_id: str | None = Field(default=None, validation_alias=AliasChoices("LOUPE_SPACE_ID", "SPACE_ID"),
                                 description="Set by Hugging Face Spaces; enables HF sign-in for reviewers.")
    oauth_client_secret: str | None = Field(default=None, validation_alias=AliasChoices("OAUTH_CLIENT_SECRET"),
                                            description="Set by Spaces with hf_oauth; signs the sign-in session.")

    # --- request bodies, REST admission, bundle signing (issue 6, s4-rest) ----
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest wait for a request body to start arriving, or for its next chunk; "
        "a slower client gets 408 and its connection is closed (every route, Gradio's uploads included)."
    )
    body_min_rate: int = Field(
        default=16_384, ge=1, description="Bytes/s a body must keep up on average: each byte received adds "
        "1/body_min_rate s to the total wait allowed beyond body_timeout_s (10 MB at this rate: about 11 minutes)."
    )
    rest_max_reading: int = Field(
        default=64, ge=1, description="REST predict bodies read at once (before admission); more get 'busy'. "
        "Each costs up to ~1 MB of memory; the rest of the file spools to disk."
    )
    bundle_key: SecretStr | None = Field(
        default=None, description="Secret that signs the cached serving bundle (with the export's bytes). Set it "
        "when others can write the data dir and read the model file; changing it rebuilds the bundle once."
    )

    @property
    def hf_sign_in(self) -> bool:
        """Reviewers sign in with Hugging Face: on a Space, with an allowlist."""
        return bool(self.space_id and self.hf_allowlist.strip())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loupe.db').resolve()}"
