"""One settings object for the whole app: env vars prefixed ``LOUPE_``.

Only ``main()`` and CLI entry points build it; everything else receives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # populate_by_name: Settings(database_url=...) must work in code too, not only the env aliases.
    # hide_input_in_errors: a refused value may be a secret (a password hash, a database URL with its password),
    # and the error is printed to the console and the logs.
    model_config = SettingsConfigDict(env_prefix="LOUPE_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

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

    # --- HTTP guard: Gradio uploads and files (issue 6, items 1, 2, 6) ---------------------------------------
    gradio_temp_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("LOUPE_GRADIO_TEMP_DIR", "GRADIO_TEMP_DIR"),
        description="Where Loupe's own Gradio folder (uploads, example copies) is made; default the system temp "
        "dir. Loupe empties that folder at start-up.")
    upload_ttl_s: float = Field(default=120.0, gt=0, description="An upload no event has used is deleted this "
                                "long after it arrived (used ones go seconds after the model read them).")
    upload_budget_mb: float = Field(default=200.0, gt=0, description="MB one client address may upload through "
                                    "the web UI per 10 minutes.")
    upload_disk_mb: float = Field(default=1024.0, gt=0, description="MB of uploads held at once, all clients "
                                  "together; beyond it uploads get 503.")

    # --- reviewer login (ui/review_login.py): flood defence, lockouts, proxy trust ----------------------------
    login_max_failures: int = Field(
        default=5, ge=1, description="Failed logins allowed per username, and per client address, before a "
        "lockout: 1 s, doubling with each further failure up to login_lockout_max_s.")
    login_lockout_max_s: float = Field(
        default=900.0, gt=0, description="Longest lockout; a username's or address's failures are forgotten "
        "after this long without a new one.")
    login_concurrency: int = Field(
        default=1, ge=1, description="Password checks run at once (PBKDF2, 0.15-0.3 s of one core each, off the "
        "event loop); a few more may wait, the rest get 503 + Retry-After.")
    trust_proxy_headers: bool | None = Field(
        default=None, description="Behind a trusted reverse proxy: the client address is the last "
        "X-Forwarded-For entry and HTTPS comes from X-Forwarded-Proto. Default: on on a HF Space (SPACE_ID set: "
        "its proxy sets them), off elsewhere (the connection's own address and scheme).")

    @property
    def behind_proxy(self) -> bool:
        return bool(self.space_id) if self.trust_proxy_headers is None else self.trust_proxy_headers

    @field_validator("reviewers", "hf_allowlist")
    @classmethod
    def _accounts_parse(cls, value: str, info: ValidationInfo) -> str:
        """Fail the start, not the first login, on a malformed list (e.g. a hash whose '$' fields a shell expanded)."""
        from review.auth import parse_hf_allowlist, parse_reviewers  # stdlib only: cheap
        from review.types import ReviewError

        try:
            (parse_reviewers if info.field_name == "reviewers" else parse_hf_allowlist)(value)
        except ReviewError as e:
            raise ValueError(e.args[0]) from None
        return value
    # --- prediction log: memory, image storage, durability (issue 6) ---------------------------------------
    log_queue_mb: float = Field(
        default=64.0, gt=0, description="Upload bytes the prediction log may hold in memory while its writer "
        "catches up (one upload larger than this is let through alone); beyond it callers wait, then records drop."
    )
    store_max_side: int = Field(default=1024, ge=64, description="Stored images are shrunk to fit this many "
                                "pixels on their longer side (fastai's presizing at 460 px needs less).")
    max_storage_gb: float = Field(default=10.0, ge=0, description="Cap on the image store; above it new images "
                                  "are not stored (predictions are still logged). 0: no cap.")
    min_free_disk_gb: float = Field(default=1.0, ge=0, description="New images are not stored while the data "
                                    "disk has less free space than this.")
    log_spool: bool = Field(default=True, description="Append each prediction to an on-disk spool before its id "
                            "is returned, so a crash or kill -9 loses none (one file write per prediction); false: "
                            "predictions not yet in the database (at most LOUPE_LOG_QUEUE_SIZE) die with the process.")
    # --- public page: what the model does, its examples (issue 7, w3-first) ----
    model_description: str | None = Field(
        default=None, description="One line under the title saying what the model does and what to give it, e.g. "
        "'Grizzly, black or teddy bear? Upload a photo of a bear.' Default: the demo's own, else its classes."
    )
    examples_dir: Path | None = Field(
        default=None, description="Folder of example images shown as clickable examples (JPEG, PNG, ...); checked "
        "at start like uploads, unreadable ones are skipped with a log line. Default: the demo's digits."
    )
    max_examples: int = Field(default=20, ge=0, description="Examples shown at most (the first, by file name).")
    # --- monitoring: drift alarms, /metrics, the Monitor tab (issue 9, w5-monitor) -----------------------------
    drift_window: int = Field(default=500, ge=10, description="Drift alarms compare the latest N traffic "
                              "predictions of the serving version (read from the database) with its reference.")
    drift_window_minutes: float = Field(default=0.0, ge=0, description="...and only those of the last T minutes "
                                        "(0: no time limit).")
    drift_min_window: int = Field(default=200, ge=10, description="Fewer predictions in the window: no alarm "
                                  "(status 'insufficient_data').")
    drift_psi_classes: float = Field(default=0.25, gt=0, description="PSI above which predicted-class shares drift.")
    drift_psi_confidence: float = Field(default=0.25, gt=0, description="PSI above which confidence drifts.")
    drift_psi_inputs: float = Field(default=0.25, gt=0, description="PSI above which brightness, resolution, aspect "
                                    "ratio or the greyscale share drift.")
    drift_psi_unfamiliar: float = Field(default=0.25, gt=0, description="PSI above which the unfamiliar rate drifts.")
    monitor_every_s: float = Field(default=10.0, gt=0, description="Seconds between background checks (drift, "
                                   "queue sizes for /metrics).")
    monitor_max_rows: int = Field(default=100_000, ge=1000, description="Predictions the Monitor tab and the report "
                                  "read at most per period (the latest ones).")
    metrics_token: SecretStr | None = Field(default=None, description="If set, GET /metrics needs "
                                            "'Authorization: Bearer <token>'.")

    @field_validator("examples_dir")
    @classmethod
    def _examples_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a folder (LOUPE_EXAMPLES_DIR names a folder of example images)")
        return v
    # --- rollout: registry-driven serving, shadow, canary, promotion gate (issue 8, w4-rollout) ---------------------
    models_dir: Path | None = Field(
        default=None, description="Where registered model files live (<sha256>/export.pkl with its report/). "
        "Replicas must all reach it (a shared volume); default <data_dir>/models.")
    rollout_poll_s: float = Field(
        default=5.0, gt=0, description="How often each replica reads the registry (current version, shadow, "
        "canary): a change made anywhere is served everywhere within this, plus the load time of a model the "
        "replica has not loaded yet.")
    canary_share: float = Field(default=0.1, gt=0, le=1, description="Share of browser sessions a canary answers "
                                "when no share is given.")
    shadow_queue_size: int = Field(
        default=32, ge=1, description="Requests waiting for the shadow model; beyond it they are not shadowed "
        "(counted as dropped): the shadow never slows an answer.")
    gate_margin: float = Field(
        default=0.05, ge=0, le=1, description="Promotion gate: the candidate's accuracy may be at most this far "
        "below the current model's, at 95% confidence (paired, on the same items).")
    gate_min_shadowed: int = Field(
        default=50, ge=0, description="Promotion gate: live requests the candidate must have scored in shadow.")

    # --- unfamiliar inputs (issue 9 §1: model/unfamiliar.py, the feedback control's "none of these") ---
    model_domain: str | None = Field(
        default=None, max_length=60, description="What one input of the model is, singular (e.g. 'bear photo'): "
        "the feedback control offers 'Not a <domain>'. Default: 'digit' for the demo, else 'None of these'.")

    @property
    def hf_sign_in(self) -> bool:
        """Reviewers sign in with Hugging Face: on a Space, with an allowlist."""
        return bool(self.space_id and self.hf_allowlist.strip())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def model_store_dir(self) -> Path:
        """Registered model files: ``<sha256>/export.pkl`` (content-addressed, so every replica finds them)."""
        return Path(self.models_dir) if self.models_dir is not None else self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loupe.db').resolve()}"

