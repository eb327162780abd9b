"""A camera outage seen from the PLC: State goes to Error (camera_lost) and a job started meanwhile
gets an `error` result from the gate's trigger timeout, never silence. The station runs with
SecurityPolicy None here, which must be configured explicitly and is warned about at start.

The camera is a video file played at its frame rate that ends (stop_at_end false): to the daemon
that is a lost camera, after parts were inspected from it.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import cv2

from tests.broker import Broker, free_port
from tests.daemon_proc import Daemon, station, write_config
from tests.opcua.conftest import opcua_section
from tests.opcua.plc import connect_when_up
from tests.tiny_package import make_part

READY, ERROR = 1, 3


def test_camera_outage_gives_error_state_and_an_error_result(tmp_path: Path, tiny_package: Path,
                                                             module_broker: Broker) -> None:
    video = tmp_path / "line.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96), isColor=False)
    for i in range(60):  # 6 s of parts, then the camera is gone
        w.write(make_part(defect=False, seed=i))
    w.release()
    section = opcua_section(None)
    metrics_port = free_port()
    data = station(tmp_path, tiny_package, module_broker,
                   {"type": "video", "path": str(video), "realtime": True, "stall_timeout_s": 0.5},
                   pipeline={"mode": "triggered", "trigger_timeout_s": 1.0, "trigger_max_age_s": 0},
                   frame_checks={"max_age_s": 0}, mqtt={"no_subscribers": "deliver"}, opcua=section,
                   metrics={"enabled": True, "port": metrics_port})
    daemon = Daemon(write_config(tmp_path / "station.yaml", data), tmp_path / "daemon.log")

    async def scenario() -> tuple[dict[str, object], dict[str, object], str]:
        plc = await connect_when_up(str(section["endpoint"]), None)
        try:
            await plc.wait_state(READY, 30)
            good = await plc.cycle("before-outage")
            await plc.wait_state(ERROR, 30)  # the video ended: camera_lost
            text = (await plc.read("StateText"))[0]
            lost = await plc.cycle("during-outage")
            assert (await plc.start_job("during-outage"))[0] == 4  # Duplicate: one result per part id
            return good, lost, text
        finally:
            await plc.close()

    try:
        good, lost, state_text = asyncio.run(scenario())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        daemon.kill()
    assert 'edge_opcua_start_job_total{status="accepted"} 2.0' in metrics
    assert 'edge_opcua_start_job_total{status="duplicate"} 1.0' in metrics
    assert good["Verdict"] == "pass", good
    assert "camera_lost" in state_text
    assert lost["PartId"] == "during-outage" and lost["Verdict"] == "error"
    assert "no frame within 1.0 s after the trigger" in lost["ErrorText"]
    assert "security_policy None: no signing, no encryption" in daemon.text()
