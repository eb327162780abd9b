"""Alarms raise once and clear once (latch + hysteresis), never once per part."""

from __future__ import annotations

from typing import Any

import pytest

from edge.alarms import (
    BACKLOG_GROWING,
    CAMERA_LOST,
    CONSECUTIVE_FAILS,
    FAIL_RATE,
    HYSTERESIS,
    MODEL_ERROR,
    PUBLISH_REJECTED,
    AlarmTracker,
)
from edge.config import AlarmsConfig


def _tracker(hysteresis: float = HYSTERESIS, **kw: Any) -> tuple[AlarmTracker, list[tuple[str, bool]]]:
    seen: list[tuple[str, bool]] = []
    t = AlarmTracker(AlarmsConfig(**kw), lambda name, active, msg: seen.append((name, active)), hysteresis=hysteresis)
    return t, seen


def test_consecutive_fails_raise_once_clear_once() -> None:
    t, seen = _tracker(consecutive_fails=3, fail_rate_window=1000)
    for v in ["fail", "fail", "pass", "fail", "fail"]:
        t.observe_verdict(v)
    assert seen == []
    for _ in range(5):
        t.observe_verdict("fail")
    t.observe_verdict("error")  # an error verdict neither clears nor counts as a fail
    assert seen == [(CONSECUTIVE_FAILS, True)] and t.is_active(CONSECUTIVE_FAILS)
    t.observe_verdict("pass")
    t.observe_verdict("pass")
    assert seen == [(CONSECUTIVE_FAILS, True), (CONSECUTIVE_FAILS, False)]


def test_fail_rate_window_with_hysteresis() -> None:
    t, seen = _tracker(consecutive_fails=100, fail_rate_window=10, fail_rate_max=0.3, hysteresis=0.5)
    for _ in range(6):  # window not full yet: no verdict on the rate
        t.observe_verdict("fail")
    assert seen == []
    for _ in range(4):
        t.observe_verdict("pass")
    assert seen == [(FAIL_RATE, True)]  # 6/10 > 0.3
    for _ in range(4):  # slides to 2/10 = 0.2: below max but above the 0.15 clear level
        t.observe_verdict("pass")
    assert seen == [(FAIL_RATE, True)]
    t.observe_verdict("pass")  # 1/10 <= 0.15
    assert seen == [(FAIL_RATE, True), (FAIL_RATE, False)]


def test_health_alarms_latch() -> None:
    t, seen = _tracker()
    t.observe_camera(False, "no frames for 2 s")
    t.observe_camera(False)
    t.observe_camera(True)
    t.observe_camera(True)
    t.observe_inference(False, "boom")
    t.observe_inference(True)
    t.set(PUBLISH_REJECTED, True, "0x87")
    t.set(PUBLISH_REJECTED, True, "0x87")
    assert seen == [(CAMERA_LOST, True), (CAMERA_LOST, False), (MODEL_ERROR, True), (MODEL_ERROR, False),
                    (PUBLISH_REJECTED, True)]
    assert t.active() == {PUBLISH_REJECTED: "0x87"}


def test_backlog_hysteresis() -> None:
    t, seen = _tracker(backlog_ratio=0.5, hysteresis=0.8)
    for r in [0.1, 0.51, 0.6, 0.45, 0.41, 0.55, 0.39, 0.2]:
        t.observe_backlog(r)
    assert seen == [(BACKLOG_GROWING, True), (BACKLOG_GROWING, False)]


def test_callback_failure_does_not_propagate() -> None:
    def bad(name: str, active: bool, msg: str) -> None:
        raise RuntimeError("mqtt down")

    t = AlarmTracker(AlarmsConfig(), bad)
    t.observe_camera(False)
    assert t.is_active(CAMERA_LOST)


def test_settings_validated() -> None:
    with pytest.raises(ValueError):
        AlarmTracker(AlarmsConfig(fail_rate_max=0))
