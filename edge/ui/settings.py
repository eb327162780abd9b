"""The `ui:` section of the station YAML: where the page listens, who may review, how long it remembers.

Pydantic only (no FastAPI), so `edge.config` can include it and `check-config` validates it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class DriftConfig(BaseModel):
    """EWMA drift alarms raised by the page process on <base>/alarm (so dashboards see them)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="Watch fail rate and sharpness for drift.")
    alpha: float = Field(default=0.05, gt=0, le=1, description="EWMA weight of the newest part.")
    warmup_parts: int = Field(default=50, ge=1, le=1_000_000, description="Parts that set the baseline before any alarm.")
    fail_rate_rise: float = Field(default=0.15, gt=0, le=1, description="Alarm when the fail-rate EWMA is this far "
                                  "above the baseline fail rate (absolute share).")
    sharpness_drop: float = Field(default=0.4, gt=0, lt=1, description="Alarm when the sharpness EWMA falls below "
                                  "(1 - this) x the baseline sharpness (a soiled lens, lost focus).")


class UiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(default="127.0.0.1", min_length=1, description="Bind address of the page; keep localhost "
                      "unless a reverse proxy with TLS is in front.")
    port: int = Field(default=8088, ge=0, le=65535, description="HTTP port (0 = any free port).")
    db: Path | None = Field(default=None, description="The page's SQLite index of events and reviews "
                            "(default <state_dir>/ui.sqlite3).")
    keep_events: int = Field(default=50_000, ge=100, le=10_000_000, description="Events kept in the index "
                             "(the oldest beyond are dropped; reviews are kept).")
    users_file: Path | None = Field(default=None, description="Reviewers: lines 'name:scrypt$...' made by "
                                    "`python -m edge ui-user`. Without users_file and token_file nobody can review.")
    token_file: Path | None = Field(default=None, description="Alternatively one access token (first line); "
                                    "its holder logs in as reviewer 'token'.")
    login_to_view: bool = Field(default=False, description="Also require a login to see the page at all.")
    live_hz: float = Field(default=4.0, ge=0.5, le=30, description="Live view updates per second at most.")
    preview_hz: float = Field(default=2.0, ge=0, le=10, description="Read by the daemon: small JPEG previews of the "
                              "newest part (with overlay) per second on <base>/preview, for the live view "
                              "(0 = none; the live view then shows kept evidence only).")
    cookie_secure: bool = Field(default=False, description="Send the session cookie only over HTTPS "
                                "(set when a TLS proxy is in front).")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Drift alarms.")
