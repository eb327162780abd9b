"""A PLC simulator (asyncua client) drives the real daemon (`python -m edge run`) over a
Basic256Sha256 SignAndEncrypt session: triggers in sequence, recipe switching, a trigger while
Busy, wrong and untrusted certificates, and a SIGKILL in the middle of a cycle.

Every part the synthetic camera shows carries a defect (defect_rate 1), so the station's own
rules fail it and the `lenient` recipe (max_defects 5) passes it: the verdict shows which rules
judged the part. Each result is also checked on MQTT (the same gate, the same outbox).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from edge.opcua.certs import make_certificate, write_pair
from tests.broker import Broker, Subscriber
from tests.daemon_proc import BASE, Daemon, station, write_config
from tests.opcua.conftest import opcua_section
from tests.opcua.plc import Plc, connect_when_up

READY, BUSY = 1, 2
ACCEPTED, REFUSED_BUSY, UNKNOWN_RECIPE, BAD_PART_ID, DUPLICATE = 0, 1, 2, 3, 4
MAX_JOBS = 3


@dataclass
class Station:
    url: str
    certs: Path
    config: Path
    sub: Subscriber
    daemon: Daemon
    log: Path

    def plc(self, **kw: Any) -> Plc:
        return Plc(self.url, self.certs / "clients/plc", **kw)

    def mqtt_results(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.sub.on(f"{BASE}/result")]

    def restart(self) -> None:
        self.daemon = Daemon(self.config, self.log)


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, tiny_package: Path, module_broker: Broker,
       opcua_certs: Path) -> Iterator[Station]:
    tmp = tmp_path_factory.mktemp("opcua-station")
    section = opcua_section(opcua_certs, max_jobs=MAX_JOBS)
    data = station(tmp, tiny_package, module_broker,
                   {"type": "synthetic", "fps": 50, "count": 0, "defect_rate": 1.0, "width": 128, "height": 96},
                   pipeline={"mode": "triggered", "trigger_timeout_s": 3.0, "trigger_max_age_s": 0},
                   mqtt={"no_subscribers": "deliver"}, recipes={"lenient": {"max_defects": 5}}, opcua=section)
    config = write_config(tmp / "station.yaml", data)
    sub = Subscriber(module_broker, [f"{BASE}/#"])
    log = tmp / "daemon.log"
    s = Station(str(section["endpoint"]), opcua_certs, config, sub, Daemon(config, log), log)
    try:
        yield s
    finally:
        s.daemon.kill()
        sub.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _connected(s: Station, **kw: Any) -> Plc:
    return await connect_when_up(s.url, s.certs / "clients/plc", **kw)


def test_triggers_in_sequence_give_one_result_each_and_recipes_switch(st: Station) -> None:
    async def scenario() -> list[dict[str, Any]]:
        plc = await _connected(st)
        try:
            await plc.wait_state(READY, 30)
            assert (await plc.read("Recipes"))[0] == ["lenient"]
            return [await plc.cycle(f"seq-{i}", "lenient" if i % 2 else "") for i in range(8)]
        finally:
            await plc.close()

    results = run(scenario())
    assert [r["PartId"] for r in results] == [f"seq-{i}" for i in range(8)]
    counters = [r["Counter"] for r in results]
    assert counters == list(range(counters[0], counters[0] + 8))  # one result per trigger, none skipped
    assert [r["Verdict"] for r in results] == ["fail", "pass"] * 4, "recipe lenient (max_defects 5) passes"
    assert [r["Recipe"] for r in results] == ["", "lenient"] * 4
    assert all(r["PlcJob"] and r["DefectCount"] >= 1 and r["TotalDefectArea"] > 0 for r in results)
    assert all(r["ModelVersion"] == "1.0.0" and r["ErrorText"] == "" for r in results)
    assert all(r["TriggerTime"] <= r["CaptureTime"] <= r["ResultTime"] for r in results)
    # The same results went through the MQTT outbox, once per part, with the recipe recorded.
    assert st.sub.wait_for(lambda _: {f"seq-{i}" for i in range(8)} <= {e["part_id"] for e in st.mqtt_results()})
    events = {e["part_id"]: e for e in st.mqtt_results() if e["part_id"].startswith("seq-")}
    assert Counter(e["part_id"] for e in st.mqtt_results() if e["part_id"].startswith("seq-")) == \
        dict.fromkeys(events, 1)
    for r in results:
        assert events[r["PartId"]]["event_id"] == r["EventId"]
        assert events[r["PartId"]]["rules"].get("recipe") == (r["Recipe"] or None)


def test_jobs_while_busy_are_queued_up_to_the_limit_then_refused(st: Station) -> None:
    async def scenario() -> None:
        plc = await _connected(st)
        try:
            await plc.wait_state(READY)
            assert await plc.start_job("busy-0") == (ACCEPTED, "accepted")
            assert (await plc.start_job("busy-0"))[0] == DUPLICATE  # the same part twice: no second result
            for i in (1, 2):
                assert (await plc.start_job(f"busy-{i}"))[0] == ACCEPTED  # queued while Busy
            assert await plc.state() == BUSY
            status, text = await plc.start_job("busy-3")
            assert status == REFUSED_BUSY and f"opcua.max_jobs {MAX_JOBS}" in text
            # Results come one at a time, oldest first, each until acknowledged; a wrong counter is refused.
            seen = []
            for _ in range(3):
                r = await plc.wait_result()
                wrong = await plc.acknowledge(r["Counter"] + 7)
                assert wrong[0] != 0
                ack = await plc.acknowledge(r["Counter"])
                assert ack[0] == 0, (r, wrong, ack)
                seen.append(r["PartId"])
            assert seen == ["busy-0", "busy-1", "busy-2"]
            await plc.wait_state(READY)
            assert (await plc.acknowledge(0))[0] != 0  # nothing pending
            assert (await plc.cycle("busy-3"))["PartId"] == "busy-3"  # after the refusal, a retry works
        finally:
            await plc.close()

    run(scenario())
    assert st.sub.wait_for(lambda _: sum(e["part_id"].startswith("busy-") for e in st.mqtt_results()) >= 4)
    assert sorted(e["part_id"] for e in st.mqtt_results() if e["part_id"].startswith("busy-")) == \
        [f"busy-{i}" for i in range(4)]


def test_unknown_recipe_and_bad_part_id_are_refused_with_a_readable_status(st: Station) -> None:
    async def scenario() -> None:
        plc = await _connected(st)
        try:
            status, text = await plc.start_job("r-1", "no-such-recipe")
            assert status == UNKNOWN_RECIPE and "lenient" in text
            assert (await plc.start_job("a/b"))[0] == BAD_PART_ID
            assert (await plc.start_job(""))[0] == BAD_PART_ID
            assert (await plc.read("JobsRunning"))[0] == 0  # nothing was started
        finally:
            await plc.close()

    run(scenario())


def test_untrusted_and_wrong_certificates_are_refused(st: Station, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"  # a valid certificate nobody put into trusted/
    write_pair(stranger, *make_certificate("stranger", "urn:edge-inspection:client:stranger", [], 30))
    (stranger / "server.der").write_bytes((st.certs / "server/cert.der").read_bytes())
    thief = tmp_path / "thief"  # the trusted PLC certificate, with a key that is not its own
    _, other_key = make_certificate("thief", "urn:x", [], 30)
    write_pair(thief, *make_certificate("thief", "urn:x", [], 30, key=other_key))
    (thief / "cert.der").write_bytes((st.certs / "clients/plc/cert.der").read_bytes())
    (thief / "server.der").write_bytes((st.certs / "server/cert.der").read_bytes())

    async def refused(plc: Plc) -> BaseException:
        with pytest.raises((ua.UaError, OSError, asyncio.TimeoutError)) as ei:
            await plc.connect()
        await plc.close()
        return ei.value

    async def scenario() -> None:
        untrusted = await refused(Plc(st.url, stranger, name="stranger"))
        assert isinstance(untrusted, ua.UaStatusCodeError)
        assert untrusted.code in (ua.StatusCodes.BadCertificateUntrusted, ua.StatusCodes.BadUserAccessDenied)
        await refused(Plc(st.url, thief, name="thief", timeout_s=2.0))  # its signature does not verify: no answer
        # Anonymous identity is off by default: a trusted channel alone is not enough.
        anonymous = await refused(Plc(st.url, st.certs / "clients/plc", identity="anonymous"))
        assert isinstance(anonymous, ua.UaStatusCodeError)
        # No SecurityPolicy None endpoint exists unless configured.
        await refused(Plc(st.url, None))
        # The second trusted client still gets in, and the station kept working.
        plc2 = await Plc(st.url, st.certs / "clients/plc2", name="plc2").connect()
        assert await plc2.state() in (READY, BUSY)
        await plc2.close()
        # Trusting the stranger is copying its certificate into trusted/: no restart.
        copied = st.certs / "trusted/stranger.der"
        copied.write_bytes((stranger / "cert.der").read_bytes())
        try:
            welcome = await Plc(st.url, stranger, name="stranger").connect()
            assert await welcome.state() in (READY, BUSY)
            await welcome.close()
        finally:
            copied.unlink()

    run(scenario())
    assert "is not in" in st.daemon.text() and "copy its DER file there" in st.daemon.text()


def test_sigkill_mid_cycle_plc_sees_the_drop_then_recovers_with_one_result(st: Station) -> None:
    async def before_kill() -> None:
        plc = await _connected(st)
        await plc.wait_state(READY)
        assert (await plc.start_job("killed-1"))[0] == ACCEPTED
        st.daemon.signal(signal.SIGKILL)  # mid-cycle: the job is started, its result not read
        st.daemon.wait(10)
        with pytest.raises((ua.UaError, OSError, asyncio.TimeoutError, ConnectionError)):
            for _ in range(50):  # the PLC's next cyclic reads fail: it knows the station is gone
                await plc.state()
                await asyncio.sleep(0.05)
        await plc.close()

    run(before_kill())
    st.restart()

    async def after_restart() -> dict[str, Any]:
        plc = await _connected(st, timeout_s=4.0)
        try:
            result = await plc.wait_result(20)  # its result: real if it was stored, else `error` (restarted)
            assert (await plc.acknowledge(result["Counter"]))[0] == 0
            await plc.wait_state(READY)
            after = await plc.cycle("after-restart")
            assert after["PartId"] == "after-restart" and after["Counter"] > result["Counter"]
            return result
        finally:
            await plc.close()

    result = run(after_restart())
    assert result["PartId"] == "killed-1"
    assert result["Verdict"] == "fail" or "restarted" in result["ErrorText"], result
    assert st.sub.wait_for(lambda _: any(e["part_id"] == "after-restart" for e in st.mqtt_results()))
    killed = [e for e in st.mqtt_results() if e["part_id"] == "killed-1"]
    assert len({e["event_id"] for e in killed}) == 1 and killed[0]["event_id"] == result["EventId"]


def test_sigterm_stops_the_station_and_its_server_cleanly(st: Station) -> None:
    st.daemon.signal(signal.SIGTERM)
    assert st.daemon.wait(30) == 0, st.daemon.text()[-3000:]
    assert "station l1/s1 stopped" in st.daemon.text()
