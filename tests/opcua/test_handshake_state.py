"""The handshake's own rules without a server: what a restart keeps, what is refused, and the trust
checks of the server's certificate folder (fast; the daemon tests show the same over OPC UA)."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from edge.config import PipelineConfig
from edge.events import build_result_event, encode
from edge.metrics import Metrics
from edge.opcua.certs import make_certificate
from edge.opcua.handshake import AckStatus, Handshake, JobStatus, State
from edge.opcua.server import TrustedClients
from edge.sources.base import Frame
from edge.triggering.gate import FrameGate


def _result(gate: FrameGate, part_id: str, verdict: str = "pass") -> tuple[Frame, str, bytes]:
    """What the flow hands its listeners: the part's frame and its encoded event."""
    ts = time.time()
    frame = Frame(part_id, ts, None, live=False, meta={"trigger_ts": ts})
    event = build_result_event(station={"line": "l1", "name": "s1"}, seq=1, part_id=part_id, capture_ts=ts,
                               verdict=verdict, reasons=[], regions=[], total_defect_area=0,
                               image={"width": 8, "height": 8}, model={"name": "m", "version": "2.0"},
                               rules={"recipe": "a"}, timings_ms={"capture_to_result": 3.0, "inference": 1.0},
                               error="camera gone" if verdict == "error" else None)
    return frame, str(event["event_id"]), encode(event)


def test_unacknowledged_results_and_the_counter_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "opcua-results.json"
    gate = FrameGate(PipelineConfig(mode="triggered", trigger_max_age_s=0), Metrics(), recipes={"a"})
    hs = Handshake(gate, max_jobs=2, state_path=path)
    assert hs.start_job("p1", "a")[0] == JobStatus.NOT_READY  # before the station inspects
    hs.set_ready(True)
    assert hs.start_job("p1", "a") == (JobStatus.ACCEPTED, "accepted with recipe 'a'")
    assert hs.start_job("p2", "")[0] == JobStatus.ACCEPTED
    assert hs.start_job("p3", "")[0] == JobStatus.BUSY
    assert hs.view().state == State.BUSY and hs.view().jobs == 2
    hs.on_result(*_result(gate, "p1"))
    hs.on_result(*_result(gate, "p2", "error"))
    assert hs.acknowledge(1) == (AckStatus.OK, "result 1 acknowledged")

    again = Handshake(gate, max_jobs=2, state_path=path)  # the daemon restarted
    again.set_ready(True)
    view = again.view()
    assert view.state == State.BUSY and view.unacked == 1 and view.counter == 2
    assert view.result is not None and (view.result.part_id, view.result.verdict) == ("p2", "error")
    assert view.result.error == "camera gone" and view.result.model_version == "2.0"
    assert again.acknowledge(1)[0] == AckStatus.WRONG_COUNTER
    assert again.acknowledge(2)[0] == AckStatus.OK and again.view().state == State.READY
    assert again.view().result is not None and again.view().counter == 2  # the last one stays on show
    again.on_result(*_result(gate, "mqtt-1"))  # an MQTT trigger's result: shown too, not a PLC job
    assert again.view().counter == 3 and again.view().result.plc_job is False  # type: ignore[union-attr]


def test_a_torn_state_file_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "opcua-results.json"
    path.write_text('{"counter": 3, "unack')
    hs = Handshake(FrameGate(PipelineConfig(mode="triggered"), Metrics()), 1, path)
    assert hs.view().unacked == 0


def test_trusted_folder_takes_der_and_pem_and_names_what_to_copy(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    known, _ = make_certificate("plc", "urn:plc", [], 10)
    stranger, _ = make_certificate("stranger", "urn:s", [], 10)
    (trusted / "plc.pem").write_bytes(known.public_bytes(Encoding.PEM))
    (trusted / "notes.txt").write_text("not a certificate")
    trust = TrustedClients(trusted)
    assert trust.refuse(known.public_bytes(Encoding.DER)) is None
    why = trust.refuse(stranger.public_bytes(Encoding.DER))
    assert why is not None and "CN=stranger" in why and str(trusted) in why
    assert trust.get_user(None, certificate=known.public_bytes(Encoding.DER)) is not None
    assert trust.get_user(None, certificate=stranger.public_bytes(Encoding.DER)) is None
    assert trust.get_user(None, certificate=None) is None  # no certificate proved a key
    assert trust.get_user(None, username="admin", password="x") is None
    assert TrustedClients(trusted, open_access=True).get_user(None, certificate=None) is not None


def test_opcua_certs_cli_writes_private_keys_0600_and_never_replaces_one(tmp_path: Path) -> None:
    from edge.__main__ import main

    assert main(["opcua-certs", "--out", str(tmp_path), "--client", "press-7", "--days", "30"]) == 0
    for key in (tmp_path / "server/key.pem", tmp_path / "clients/press-7/key.pem"):
        assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "trusted/press-7.der").read_bytes() == (tmp_path / "clients/press-7/cert.der").read_bytes()
    before = (tmp_path / "server/key.pem").read_bytes()
    assert main(["opcua-certs", "--out", str(tmp_path)]) == 1  # a deployed key must not change under a PLC
    assert (tmp_path / "server/key.pem").read_bytes() == before
