"""Reviewer logins, signed session cookies and CSRF tokens for the station page.

Who may review is a plain file of `name:scrypt$N$r$p$salt$hash` lines (`python -m edge ui-user`
appends one), or a single access token read from a file (e.g. a systemd credential). Passwords
are never stored: scrypt is memory-hard, so a stolen users file is slow to brute-force.
Sessions are stateless cookies `name|expiry|hmac`, signed with a random key the page keeps in
its state dir (so a restart keeps people logged in, and nobody can forge a reviewer's name).
Every POST carries a CSRF token: the HMAC of a random per-browser cookie (double submit), so a
page on another site cannot make a logged-in reviewer's browser post a review.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SESSION_COOKIE = "edge_ui_session"
CSRF_COOKIE = "edge_ui_csrf"
SESSION_S = 12 * 3600  # one shift and a half
TOKEN_USER = "token"
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SCRYPT = (2**14, 8, 1)  # N, r, p: 16 MiB and ~50 ms per check
MAX_PASSWORD = 1024  # characters; a longer one is refused without hashing


class AuthError(ValueError):
    """A users/token file that cannot be used; the message names the file and line."""


def hash_password(password: str) -> str:
    n, r, p = _SCRYPT
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def read_users(path: Path) -> dict[str, str]:
    """name -> stored hash; blank lines and '#' comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"ui.users_file: cannot read {path}: {e}") from None
    users = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not NAME_RE.match(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise AuthError(f"{path}:{i}: expected 'name:scrypt$N$r$p$salt$hash' (made by `python -m edge ui-user`)")
        users[name] = stored
    return users


def add_user(path: Path, name: str, password: str) -> None:
    """Append or replace one user's line; the file is rewritten atomically (new: mode 0600; else its mode
    and owner are kept)."""
    if not NAME_RE.match(name):
        raise AuthError(f"user name {name!r}: use 1-64 letters, digits or _ . @ -")
    if len(password) < 8:
        raise AuthError("password: at least 8 characters")
    users = read_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{u}:{h}\n" for u, h in users.items()))
        if path.exists():  # keep the mode and group an admin gave it (e.g. root:edge-inspect 0640)
            st = path.stat()
            os.fchmod(f.fileno(), st.st_mode & 0o777)
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
    tmp.replace(path)


def load_secret(state_dir: Path) -> bytes:
    """The page's signing key, made once (0600) in the state dir."""
    path = state_dir / "ui-secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 32:
        raise AuthError(f"{path}: signing key shorter than 32 bytes; delete it to make a new one")
    return key


class Auth:
    """Checks logins and signs/verifies session cookies and CSRF tokens."""

    def __init__(self, secret: bytes, users_file: Path | None = None, token_file: Path | None = None) -> None:
        self.secret = secret
        self.users_file, self.token = users_file, None
        # One password check at a time: scrypt takes ~50 ms of a core and 16 MiB, and a burst of logins on the
        # threadpool's 40 threads would take both cores of the line PC from inspection. Unknown names are checked
        # against a hash made once, so they cost one check too.
        self._check_lock = threading.Lock()
        self._unknown = hash_password(secrets.token_hex(8)) if users_file is not None else ""
        if users_file is not None:
            read_users(users_file)  # a broken file is a startup error, not a silent lock-out
        if token_file is not None:
            try:
                lines = token_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise AuthError(f"ui.token_file: cannot read {token_file}: {e}") from None
            if not lines or len(lines[0].strip()) < 16:
                raise AuthError(f"ui.token_file: {token_file}: first line must be a token of >= 16 characters")
            self.token = lines[0].strip()

    @property
    def enabled(self) -> bool:
        """False: nobody can log in, so nobody can review (the page is read-only)."""
        return self.users_file is not None or self.token is not None

    def login(self, name: str, password: str) -> str | None:
        """The reviewer's name if the credentials are right (users re-read, so edits apply at once)."""
        if self.token is not None and name in ("", TOKEN_USER) and hmac.compare_digest(password.encode(),
                                                                                        self.token.encode()):
            return TOKEN_USER
        if self.users_file is not None and NAME_RE.match(name):
            try:
                stored = read_users(self.users_file).get(name)
            except AuthError as e:  # edited into a broken state while running: nobody logs in, and it says why
                log.error("login refused: %s", e)
                return None
            if len(password) > MAX_PASSWORD:
                return None
            with self._check_lock:
                if check_password(password, stored if stored is not None else self._unknown) and stored is not None:
                    return name
        return None

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def session_cookie(self, name: str) -> str:
        body = f"{name}|{int(time.time()) + SESSION_S}"
        return f"{body}|{self._sign('session|' + body)}"

    def reviewer(self, cookie: str | None) -> str | None:
        """The logged-in reviewer of a session cookie, or None (missing, forged or expired)."""
        if not cookie or not self.enabled:
            return None
        parts = cookie.split("|")
        if len(parts) != 3:
            return None
        name, expiry, mac = parts
        if not hmac.compare_digest(mac, self._sign(f"session|{name}|{expiry}")):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        return name

    def csrf_token(self, csrf_cookie: str) -> str:
        return self._sign("csrf|" + csrf_cookie)

    def csrf_ok(self, csrf_cookie: str | None, token: str | None) -> bool:
        return bool(csrf_cookie and token) and hmac.compare_digest(self.csrf_token(csrf_cookie or ""), token or "")
