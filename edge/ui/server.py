"""`python -m edge ui --config STATION.yaml`: wires the store, the MQTT listener and the web app, then serves.

Startup is a flat list of steps; anything wrong with the setup (users file, state dir) is a
startup error with the file named, exit 78, so systemd does not restart-loop on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.config import Config
from edge.ui.store import DB_NAME

log = logging.getLogger(__name__)


def db_path(cfg: Config) -> Path:
    return cfg.ui.db or cfg.state_dir / DB_NAME


def evidence_root(cfg: Config) -> Path:
    return cfg.evidence.dir or cfg.state_dir / "evidence"


def serve(cfg: Config, host: str | None = None, port: int | None = None) -> int:
    """Run the page until SIGTERM/SIGINT (uvicorn handles both); returns the exit code."""
    import uvicorn

    from edge.ui.app import create_app
    from edge.ui.auth import Auth, load_secret
    from edge.ui.evidence_files import EvidenceFiles
    from edge.ui.listener import StationListener
    from edge.ui.store import Store

    ui = cfg.ui
    store = Store(db_path(cfg), keep_events=ui.keep_events)
    store.set_meta("evidence_dir", str(evidence_root(cfg)))  # review-export finds the images from the db
    store.set_meta("base_topic", cfg.base_topic)
    auth = Auth(load_secret(cfg.state_dir), ui.users_file, ui.token_file)
    if not auth.enabled:
        log.warning("no ui.users_file or ui.token_file: the page is read-only, nobody can review")
    listener = StationListener(cfg, store)
    listener.start()
    app = create_app(store, listener, auth, EvidenceFiles(evidence_root(cfg)), live_hz=ui.live_hz,
                     login_to_view=ui.login_to_view, cookie_secure=ui.cookie_secure,
                     station_name=f"{cfg.station.line}/{cfg.station.name}")
    bind_host, bind_port = host or ui.host, ui.port if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=bind_host, port=bind_port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=2))
    log.info("station page on http://%s:%d/ (station %s)", bind_host, bind_port, cfg.base_topic)
    try:
        server.run()
    finally:
        listener.stop()
        store.close()
    return 0 if server.started else 1
