"""Group commit under SIGKILL: the real daemon (`python -m edge run`) on a hot folder with a backlog, so
results share outbox transactions, killed at random points while groups are being stored and files
moved. Every part must reach a real subscriber with one event_id; no file may leave the folder
without its result (a kill between a group's fsync and its file moves only redelivers)."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

from tests.broker import Broker
from tests.daemon_proc import Daemon, station, write_config
from tests.faults.harness import Feeder, PersistentSubscriber, check, tally
from tests.faults.test_faults import outbox_integrity, outbox_rows, stats, stop_daemon, verdict_of

PARTS, KILLS, SEED = 1000, 4, 20


def test_sigkill_while_groups_are_committed(tmp_path: Path, tiny_package: Path, report: Any) -> None:
    broker = Broker(tmp_path / "broker").start()
    sub = PersistentSubscriber(broker.host, broker.port)
    inbox = tmp_path / "in"
    inbox.mkdir()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "station.yaml", station(
        tmp_path, tiny_package, broker, {"type": "folder", "path": str(inbox), "settle_s": 0.0,
                                         "poll_interval_s": 0.05},
        outbox={"group_commit_max": 64, "group_commit_ms": 5.0}, evidence={"enabled": False},
        logging={"level": "DEBUG"}))  # the debug line per group shows that groups formed
    feeder = Feeder(inbox, PARTS, 0).start()  # all at once: every start meets a backlog, results come in groups
    rng = random.Random(SEED)
    points: list[str] = []
    restart_to_result: list[float] = []
    d: Daemon | None = None
    try:
        for k in range(KILLS + 1):
            d = Daemon(cfg, tmp_path / f"daemon{k}.log")
            t_spawn = time.monotonic()
            if k == KILLS:
                break
            n = len(sub.results())
            assert sub.wait_count(n + 1, 60), d.text()  # parts flow: groups are being stored and committed
            restart_to_result.append(time.monotonic() - t_spawn)
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            points.append(f"running+{delay:.2f}s")
            d.proc.kill()
            d.wait()
        assert d is not None
        feeder.join(60)
        ok = sub.wait_parts(feeder.ids, 120)
        time.sleep(0.5)
        results = sub.results()
        entry = tally("daemon SIGKILL while group commits run", feeder.ids(), results, kills=KILLS,
                      kill_points=points, restart_to_first_result_s=stats(restart_to_result))
        report(entry)
        assert ok, f"{entry}\n{d.text()[-3000:]}"
        assert stop_daemon(d) == 0, d.text()
    finally:
        feeder.stop()
        if d is not None:
            d.kill()
        sub.close()
        broker.kill()
    check(entry)  # nothing missing, no part with two event_ids
    groups = [int(m) for k in range(KILLS + 1) for m in
              re.findall(r"(\d+) result\(s\) stored in one transaction", (tmp_path / f"daemon{k}.log").read_text())]
    assert sum(groups) >= PARTS and max(groups) >= 2, f"no group commit happened: {groups[:50]}"
    assert all(e["verdict"] == verdict_of(e["part_id"]) for e in results)
    assert not [f for f in inbox.iterdir() if f.is_file() and not f.name.startswith(".")], "parts left behind"
    assert {f.stem for f in (inbox / "done").iterdir()} == feeder.ids()
    assert not list((inbox / "failed").iterdir())
    assert outbox_integrity(state) == "ok" and outbox_rows(state) == 0
    seqs = {e["event_id"]: e["seq"] for e in results}
    assert len(set(seqs.values())) == len(seqs), "a sequence number was used for two events"
