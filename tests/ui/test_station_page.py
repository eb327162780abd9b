"""The station page in a real headless Chromium, fed by the real daemon on a synthetic source
through a real Mosquitto: live updates, gallery filters, the review round trip (database, MQTT,
review-export), refused reviews when logged out, escaped hostile part ids, no path traversal.

Screenshots are kept under the pytest basetemp (screenshots*/). Skips when chromium or
chromium-driver (Debian packages, installed by scripts/setup.sh) or the `ui` extra is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker, Subscriber, free_port
from tests.daemon_proc import BASE, ROOT, Daemon, station, write_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian chromium + chromium-driver (scripts/setup.sh installs them)"),
]
selenium = pytest.importorskip("selenium", reason="needs selenium (dev extra)")
pytest.importorskip("fastapi", reason="needs the ui extra (fastapi, uvicorn, jinja2, python-multipart)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from edge.ui.auth import add_user  # noqa: E402

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
PASSWORD = "line-3-reviewer"


@dataclass
class Station:
    url: str
    state_dir: Path
    reviews: Subscriber
    broker: Broker
    shots: Path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except urllib.error.URLError:  # not listening yet
            return 0, b""

    def event_ids(self, verdict: str) -> list[str]:
        _, body = self.get(f"/parts?verdict={verdict}")
        return re.findall(r'href="/parts/([0-9a-f-]{36})"', body.decode())


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, tiny_package: Path) -> Iterator[Station]:
    tmp = tmp_path_factory.mktemp("ui")
    broker = Broker(tmp / "broker").start()
    add_user(tmp / "users", "alice", PASSWORD)
    port = free_port()
    data = station(tmp, tiny_package, broker, {"type": "synthetic", "fps": 8, "count": 0, "stop_at_end": False,
                                                "defect_rate": 0.4},
                   evidence={"pass_sample_every": 1}, metrics={"enabled": False, "stats_interval_s": 1.0},
                   ui={"port": port, "users_file": str(tmp / "users")})
    config = write_config(tmp / "station.yaml", data)
    reviews = Subscriber(broker, [f"{BASE}/review"])
    ui_log = open(tmp / "ui.log", "ab")  # noqa: SIM115 - closed below
    ui = subprocess.Popen([sys.executable, "-m", "edge", "ui", "--config", str(config)], cwd=ROOT, stdout=ui_log,
                          stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    daemon = Daemon(config, tmp / "daemon.log")
    st = Station(f"http://127.0.0.1:{port}", tmp / "state", reviews, broker, tmp_path_factory.mktemp("screenshots"))
    try:
        wait_until(lambda: len(st.event_ids("fail")) >= 3 and len(st.event_ids("pass")) >= 3, 60,
                   "the page to index passed and failed parts")
        yield st
    finally:
        for proc in (ui, daemon.proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (ui, daemon.proc):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        ui_log.close()
        reviews.close()
        broker.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions"):
        opts.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a browser or driver
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def live_text(driver: webdriver.Chrome, element_id: str) -> str:
    """Text of a live-view element read in one script: the SSE swap may replace it between a find and a read."""
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent.trim()"))


def login(driver: webdriver.Chrome, st: Station) -> None:
    driver.get(st.url + "/login")
    driver.find_element(By.NAME, "name").send_keys("alice")
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login-button").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "who"))


def db_reviews(st: Station) -> list[sqlite3.Row]:
    db = sqlite3.connect(st.state_dir / "ui.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM reviews ORDER BY id").fetchall()
    finally:
        db.close()


def test_live_view_updates_without_reload(page: Station, browser: webdriver.Chrome) -> None:
    browser.get(page.url + "/")
    browser.execute_script("window.notReloaded = true;")
    seen: set[str] = set()

    def three_parts_seen(d: webdriver.Chrome) -> bool:
        seen.add(live_text(d, "live-seq"))
        return len(seen) >= 3

    WebDriverWait(browser, 20, poll_frequency=0.1).until(three_parts_seen)
    assert browser.execute_script("return window.notReloaded === true;"), "the live view reloaded the page"
    assert live_text(browser, "state-word").lower() == "running"
    assert live_text(browser, "model-version") == "tiny-dark-spot 1.0.0"
    assert live_text(browser, "live-verdict") in ("PASS", "FAIL")
    # the daemon's preview feed (edge.preview) is what the live view shows, passed parts included
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const i = document.getElementById('live-image');"
        "return i && i.src.includes('/live/preview.jpg') && i.complete && i.naturalWidth > 0;"))
    browser.save_screenshot(str(page.shots / "live.png"))


def test_gallery_filters(page: Station, browser: webdriver.Chrome) -> None:
    browser.get(page.url + "/parts")
    Select(browser.find_element(By.NAME, "verdict")).select_by_value("fail")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    WebDriverWait(browser, 10).until(lambda d: "verdict=fail" in d.current_url)
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert cards and {c.get_attribute("data-verdict") for c in cards} == {"fail"}
    browser.save_screenshot(str(page.shots / "parts-fail.png"))
    browser.get(page.url + "/parts?verdict=pass&part=ok-")
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert cards and all(c.get_attribute("data-verdict") == "pass" for c in cards)
    assert all("ok-" in c.find_element(By.CLASS_NAME, "pid").text for c in cards)
    browser.get(page.url + "/parts?part=no-such-part")
    assert "No parts match" in browser.find_element(By.ID, "gallery").text
    browser.get(page.url + "/parts?since=2000-01-01T00:00&until=2000-01-02T00:00")
    assert browser.find_element(By.ID, "count").text.startswith("0 part(s)")
    status, body = page.get("/parts?since=yesterday")
    assert status == 400 and b"since: expected a date and time" in body
    assert page.get("/parts?verdict=maybe")[0] == 400
    assert page.get("/health?hours=nan")[0] == 200
    assert page.get("/parts?page=" + "9" * 30)[0] == 200  # an OFFSET past SQLite's integers was a 500
    browser.get(page.url + "/health")
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar-fail")
    browser.save_screenshot(str(page.shots / "health.png"))


def test_logged_out_user_cannot_review(page: Station, browser: webdriver.Chrome) -> None:
    browser.delete_all_cookies()
    event_id = page.event_ids("fail")[0]
    browser.get(f"{page.url}/parts/{event_id}")
    assert not browser.find_elements(By.ID, "review-form")
    browser.get(page.url + "/login")  # a valid CSRF token for this browser, but no session
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf: arguments[1], action: 'confirm_fail'})})"
        ".then(r => done(r.status));", f"/parts/{event_id}/review", csrf)
    assert status == 403
    no_csrf = urllib.request.Request(f"{page.url}/parts/{event_id}/review", data=b"action=false_alarm", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(no_csrf, timeout=10)
    assert e.value.code == 403
    assert not [r for r in db_reviews(page) if r["event_id"] == event_id]


def test_review_round_trip(page: Station, browser: webdriver.Chrome, tmp_path: Path) -> None:
    login(browser, page)
    (fail_id, alarm_id), pass_id = page.event_ids("fail")[:2], page.event_ids("pass")[0]
    browser.get(f"{page.url}/parts/{fail_id}")
    area = browser.find_element(By.ID, "box-img")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return arguments[0].naturalWidth", area) > 0)
    ActionChains(browser).move_to_element_with_offset(area, -60, -40).click_and_hold() \
        .move_by_offset(90, 60).release().perform()
    assert browser.find_element(By.ID, "box_w").get_attribute("value") not in ("", "0")
    browser.save_screenshot(str(page.shots / "part-box.png"))
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")
    status = browser.execute_async_script(  # logged in, but a box of 1e400 pixels: refused, not a 500
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf: arguments[1], action: 'confirm_fail', "
        "box_x: '0', box_y: '0', box_w: '1e400', box_h: '5'})}).then(r => done(r.status));",
        f"/parts/{fail_id}/review", csrf)
    assert status == 400
    browser.find_element(By.ID, "confirm-fail").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CLASS_NAME, "review-row"))
    assert "confirmed defect by alice" in browser.find_element(By.CLASS_NAME, "review-row").text
    browser.get(f"{page.url}/parts/{pass_id}")
    browser.find_element(By.ID, "escape").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CLASS_NAME, "review-row"))
    browser.get(f"{page.url}/parts/{alarm_id}")
    browser.find_element(By.ID, "false-alarm").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CLASS_NAME, "review-row"))
    browser.save_screenshot(str(page.shots / "part-reviewed.png"))

    rows = {r["event_id"]: r for r in db_reviews(page)}
    assert rows[fail_id]["action"] == "confirm_fail" and rows[fail_id]["reviewer"] == "alice"
    assert rows[fail_id]["model_version"] == "1.0.0" and json.loads(rows[fail_id]["box"])[2] > 0
    assert rows[pass_id]["action"] == "escape" and rows[alarm_id]["action"] == "false_alarm"
    topic = f"{BASE}/review"
    assert page.reviews.wait_for(lambda ms: len([m for m in ms if m.topic == topic]) >= 3, 10)
    sent = {json.loads(m.payload)["event_id"]: json.loads(m.payload) for m in page.reviews.on(topic)}
    assert sent[fail_id]["action"] == "confirm_fail" and sent[fail_id]["reviewer"] == "alice"
    assert sent[fail_id]["model"]["version"] == "1.0.0"
    wait_until(lambda: all(r["published_ts"] for r in db_reviews(page)), 10, "reviews marked as published")

    out = tmp_path / "reviewed"
    r = subprocess.run([sys.executable, "-m", "training", "review-export", "--state-dir", str(page.state_dir),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    names = {p.stem: p for p in (out / "images").iterdir()}
    masks = {p.stem for p in (out / "masks").iterdir()}
    defect = next(n for n in names if n.endswith(fail_id[:8]))
    good = next(n for n in names if n.endswith(alarm_id[:8]))
    assert defect in masks and good not in masks  # false alarm = good part = no mask
    assert [p.name[:3] for p in (out / "to_label").iterdir()] == ["ok-"]  # the escape, without a box
    assert pass_id in (out / "to_label.csv").read_text()
    from training.core.data import load_dataset

    ds = load_dataset(out)
    assert {s.name: s.defective for s in ds.samples} == {defect: True, good: False}


def test_hostile_part_id_is_escaped_and_paths_stay_inside(page: Station, browser: webdriver.Chrome) -> None:
    event_id = "0badc0de-0000-5000-8000-000000000001"
    forged = {"schema_version": 1, "event_id": event_id, "seq": 0, "station": {"line": "l1", "name": "s1"},
              "part_id": HOSTILE, "capture_ts": time.time() - 3600, "verdict": "fail", "reasons": [HOSTILE],
              "regions": [], "total_defect_area": 5, "image": {"width": 128, "height": 96},
              "model": {"name": "<b>m</b>", "version": "1", "sha256": "x", "precision": "FP32"}, "rules": {},
              "timings_ms": {"capture_to_result": 1.0}, "error": None,
              "evidence": "../../../../../../etc/passwd"}
    page.reviews.publish(f"{BASE}/result", json.dumps(forged))
    wait_until(lambda: page.get(f"/parts/{event_id}")[0] == 200, 10, "the forged event to be indexed")
    browser.get(f"{page.url}/parts/{event_id}")
    assert browser.find_element(By.ID, "part-id").text == HOSTILE
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when no script ran
    assert not browser.find_elements(By.XPATH, "//script[contains(., 'alert')]")
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    browser.get(f"{page.url}/parts?part=%3Cscript%3E")
    assert HOSTILE in browser.find_element(By.ID, "gallery").text
    browser.save_screenshot(str(page.shots / "hostile.png"))
    for kind in ("frame", "overlay", "mask", "..%2F..%2Fetc%2Fpasswd"):
        status, body = page.get(f"/evidence/{event_id}/{kind}")
        assert status == 404 and b"root:" not in body
