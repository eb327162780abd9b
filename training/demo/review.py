"""The demo's station page and one scripted review: the loop from the line back into training, visible.

The page (`python -m edge ui`) runs beside the demo's daemon; after the conveyor, one failed part
is reviewed through the page's own HTTP interface (login, CSRF token, review form) exactly as a
reviewer's browser does it: confirmed when the part's truth is a defect, a false alarm when it
was good. The review then travels on <base>/review and `training review-export` turns it into a
dataset. Skipped with a note when the `ui` extra is not installed.
"""

from __future__ import annotations

import http.cookiejar
import importlib.util
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from training.demo.station import DemoError, Listener

REPO = Path(__file__).resolve().parents[2]

DEMO_USER, DEMO_PASSWORD = "demo", "demo-reviewer"  # localhost only; a real station uses `edge ui-user`
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def page_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "jinja2", "multipart"))


def make_reviewer(users_file: Path) -> None:
    from edge.ui.auth import add_user

    add_user(users_file, DEMO_USER, DEMO_PASSWORD)


def start_page(py: str, station: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([py, "-m", "edge", "ui", "--config", str(station)], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_page(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise DemoError(f"the station page did not answer on {url} (exit code {proc.poll()})")


class PageClient:
    """A reviewer's browser in a few lines: cookies, the CSRF token from each form, form posts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> str:
        with self.opener.open(self.url + path, timeout=10) as r:
            return str(r.read().decode())

    def post(self, path: str, form_page: str, fields: dict[str, str]) -> str:
        m = _CSRF.search(self.get(form_page))
        if m is None:
            raise DemoError(f"no CSRF token in {form_page} of the station page")
        data = urllib.parse.urlencode({"csrf": m.group(1), **fields}).encode()
        try:
            with self.opener.open(urllib.request.Request(self.url + path, data=data), timeout=10) as r:
                return str(r.read().decode())
        except urllib.error.HTTPError as e:
            raise DemoError(f"the station page refused POST {path}: {e.code} {e.read()[:200]!r}") from None


def scripted_review(url: str, event: dict[str, Any], truth: str) -> str:
    """Log in and review one failed part as its truth says; returns the action taken."""
    client = PageClient(url)
    page = client.post("/login", "/login", {"name": DEMO_USER, "password": DEMO_PASSWORD})
    if f"reviewer: {DEMO_USER}" not in page:
        raise DemoError("the scripted reviewer could not log in to the station page")
    action = "false_alarm" if truth == "good" else "confirm_fail"
    part = f"/parts/{event['event_id']}"
    page = client.post(f"{part}/review", part, {"action": action, "note": "scripted review by the demo"})
    if "review-row" not in page:
        raise DemoError(f"the review of {event['part_id']} does not show on its page")
    return action


def review_one(url: str, listener: Listener, truth: dict[str, str], say: Any) -> dict[str, Any]:
    """Review the first failed part through the page and wait for the review on <base>/review."""
    failed = [r.event for r in listener.results.values() if r.event.get("verdict") == "fail"]
    if not failed:
        say("   no failed part to review")
        return {"done": False, "why": "no failed part"}
    event = failed[0]
    deadline = time.monotonic() + 10
    while True:  # the page indexes results in batches: wait for this one
        try:
            with urllib.request.urlopen(f"{url}/parts/{event['event_id']}", timeout=5):
                break
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise DemoError(f"the station page never indexed part {event['part_id']}") from None
            time.sleep(0.2)
    action = scripted_review(url, event, truth.get(event["part_id"], "?"))
    deadline = time.monotonic() + 10
    while not listener.reviews and time.monotonic() < deadline:
        time.sleep(0.1)
    if not listener.reviews:
        raise DemoError("the review was stored but never arrived on <base>/review")
    say(f"   reviewed {event['part_id']} on the page as {action} (user {DEMO_USER}); "
        f"<base>/review carried it: {listener.reviews[0].get('action')} by {listener.reviews[0].get('reviewer')}")
    return {"done": True, "part_id": event["part_id"], "event_id": event["event_id"], "action": action}
