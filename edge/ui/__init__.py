"""The station page: a separate process (`python -m edge ui`) that shows what the daemon publishes.

It reads the station's MQTT topics and evidence folder and keeps its own SQLite index; it never
imports the inspection pipeline (edge.flow, edge.daemon, OpenVINO), so a crash or a slow browser
cannot slow the line. FastAPI and friends come from the `ui` extra; this package's `settings`
module needs only pydantic, so the daemon's config can describe the page without them.
"""
