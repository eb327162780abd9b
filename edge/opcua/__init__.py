"""OPC UA PLC handshake (issue 19, docs/opcua.md): a server in the daemon, OPC 40100 style.

`attach` is the daemon's one entry: it wires the handshake to the station's gate and frame flow
and starts the server. asyncua is imported only here (the `opcua` extra), so a station without
the extra runs as before and one that enables it without the extra gets a clear config error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.config import Config, ConfigError

if TYPE_CHECKING:
    from edge.alarms import AlarmTracker
    from edge.flow import FrameFlow
    from edge.opcua.server import OpcuaServer

# Alarms that stop good results: while one is raised the station's State is Error.
FAULT_ALARMS = ("camera_lost", "model_error", "outbox_error", "trigger_store")


def attach(cfg: Config, flow: FrameFlow, alarms: AlarmTracker) -> OpcuaServer:
    """Start the server for this station; call before flow.start() (results of triggers recovered at
    start must reach it), then `server.handshake.set_ready(True)` once the station inspects."""
    try:
        from edge.opcua.server import OpcuaMetrics, OpcuaServer
    except ImportError as e:
        raise ConfigError([f"opcua.enabled: the OPC UA library is missing ({e}); install the extra: "
                           f"pip install 'defect-inspection[opcua]'"]) from None
    from edge.opcua.handshake import Handshake

    def faults() -> dict[str, str]:
        active = {k: v for k, v in alarms.active().items() if k in FAULT_ALARMS}
        if flow.fatal:
            active["pipeline"] = flow.fatal
        return active

    handshake = Handshake(flow.gate, cfg.opcua.max_jobs, cfg.state_dir / "opcua-results.json", faults)
    flow.result_listeners.append(handshake.on_result)
    server = OpcuaServer(cfg.opcua, handshake, f"{cfg.station.line}/{cfg.station.name}",
                         OpcuaMetrics(flow.metrics.registry))
    server.start()
    return server
