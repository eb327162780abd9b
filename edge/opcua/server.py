"""The OPC UA server of a station: asyncua on its own thread and event loop inside the daemon.

Why in the daemon: StartJob must reach the same FrameGate as MQTT triggers (one set of trigger
rules, one durable store), and results reach the PLC from the same result thread that puts them
in the MQTT outbox. The loop never blocks on the station: StartJob and Acknowledge run on its
executor, results wake the publisher with call_soon_threadsafe.

Security (docs/opcua.md): Basic256Sha256 SignAndEncrypt by default, with the station's own
certificate; a client is let in only with a certificate found in `opcua.trusted_clients` - checked
at CreateSession (BadCertificateUntrusted) and again at ActivateSession against the certificate
that proves its key (the user identity token, or the secure channel's for an anonymous identity),
so a client cannot borrow a trusted certificate it has no key for. SecurityPolicy None exists
only when configured, with allow_anonymous, and is logged as a warning at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, Counter

from edge.config import ConfigError, OpcuaConfig
from edge.opcua import address_space
from edge.opcua.certs import SERVER_URI, load_certificate
from edge.opcua.handshake import Handshake

log = logging.getLogger(__name__)
PUBLISH_TICK_S = 0.2  # faults (alarms) are polled this often; results and jobs wake the publisher at once


class OpcuaMetrics:
    """Prometheus counters of the PLC side, in the station's registry (/metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.jobs = Counter("edge_opcua_start_job", "OPC UA StartJob calls by status.", ["status"], registry=registry)
        self.refused = Counter("edge_opcua_sessions_refused", "OPC UA sessions refused: certificate not trusted "
                               "or identity not allowed.", registry=registry)


class TrustedClients:
    """The folder of trusted client certificates, read again for each new session (adding a PLC
    needs no restart); a certificate is trusted when its exact DER bytes are in the folder."""

    def __init__(self, folder: Path | None, open_access: bool = False,
                 on_refuse: Callable[[], None] = lambda: None) -> None:
        self.folder = folder
        self.open_access = open_access  # SecurityPolicy None with allow_anonymous: no certificate to check
        self._on_refuse = on_refuse

    def _trusted(self) -> set[bytes]:
        out: set[bytes] = set()
        if self.folder is None:
            return out
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() in (".der", ".pem", ".crt", ".cer") and path.is_file():
                try:
                    out.add(load_certificate(path).public_bytes(Encoding.DER))
                except (OSError, ValueError) as e:
                    log.error("OPC UA: trusted client certificate %s skipped: %s", path, e)
        return out

    def refuse(self, der: bytes) -> str | None:
        """Why this certificate is refused, or None."""
        if der in self._trusted():
            return None
        self._on_refuse()
        try:
            cn = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except ValueError:
            cn = "unparsable certificate"
        return (f"client certificate {cn} (sha1 {hashlib.sha1(der).hexdigest()}) is not in {self.folder}: "
                f"copy its DER file there to trust it")

    async def validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua certificate validator (CreateSession)."""
        import datetime as dt
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning("OPC UA: session refused: client certificate %s is outside its validity",
                        cert.subject.rfc4514_string())
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        why = self.refuse(cert.public_bytes(Encoding.DER))
        if why is not None:
            log.warning("OPC UA: session refused: %s", why)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        """asyncua user manager (ActivateSession): `certificate` proved its key (token or channel)."""
        if username is not None:
            log.warning("OPC UA: session refused: user names are not accepted, only certificates")
            self._on_refuse()
            return None
        if not certificate:  # no certificate proved a key: only a configured SecurityPolicy None lets it in
            if self.open_access:
                return User(role=UserRole.User, name="anonymous")
            self._on_refuse()
            return None
        der = certificate if isinstance(certificate, bytes) else certificate.public_bytes(Encoding.DER)
        why = self.refuse(der)
        if why is not None:
            log.warning("OPC UA: session refused at activation: %s", why)
            return None
        return User(role=UserRole.User, name=hashlib.sha1(der).hexdigest())


class OpcuaServer:
    """Start/stop from the daemon's thread; everything else runs on the server's loop."""

    def __init__(self, cfg: OpcuaConfig, handshake: Handshake, station_name: str,
                 metrics: OpcuaMetrics | None = None) -> None:
        self.cfg, self.handshake, self.station_name = cfg, handshake, station_name
        self.metrics = metrics or OpcuaMetrics(CollectorRegistry())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nodes: address_space.StationNodes | None = None
        self._publishing = asyncio.Lock()  # one publish at a time, each of the view current inside it
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self.endpoint = cfg.endpoint

    def start(self, timeout: float = 60.0) -> None:
        """Listen; raises ConfigError (unusable certificate files) or the startup error."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"OPC UA server did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def alive(self) -> bool:
        """False once the server's thread ended (an error after start): the daemon exits and is restarted."""
        return self._thread.is_alive()

    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def _run(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):  # asyncua logs every method call at INFO: one line per part
            logging.getLogger("asyncua").setLevel(logging.WARNING)
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start(), or logged when the server dies later
            if self._started.is_set():
                log.exception("OPC UA server stopped on an error")
            else:
                self._error = e
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop, self._wake, self._stop = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        server = await self._server()
        nodes = await address_space.build(server, await server.register_namespace(self.cfg.namespace_uri),
                                          self.station_name, sorted(self.handshake.recipes),
                                          self._start_job, self._acknowledge)
        self._nodes = nodes
        await self._publish()
        self.handshake.on_change = self._wakeup
        async with server:
            log.info("OPC UA server listening on %s (security %s, namespace %s)", self.cfg.endpoint,
                     self.cfg.security_policy, self.cfg.namespace_uri)
            self._started.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), PUBLISH_TICK_S)
                self._wake.clear()
                await self._publish()
            self.handshake.on_change = lambda: None

    async def _server(self) -> Server:
        cfg = self.cfg
        trust = TrustedClients(cfg.trusted_clients, open_access=cfg.security_policy == "None",
                               on_refuse=self.metrics.refused.inc)
        server = Server(user_manager=trust)  # type: ignore[arg-type]  # asyncua's UserManager is duck-typed
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"edge-inspection station {self.station_name}")
        await server.set_application_uri(SERVER_URI)
        if cfg.security_policy == "None":
            log.warning("OPC UA: security_policy None: no signing, no encryption, anyone on the network may "
                        "start jobs at %s. Use Basic256Sha256 outside an isolated test bench", cfg.endpoint)
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        else:
            assert cfg.certificate is not None and cfg.private_key is not None  # the config validator says so
            for name, path in (("certificate", cfg.certificate), ("private_key", cfg.private_key)):
                if not path.is_file():
                    raise ConfigError([f"opcua.{name}: {path} does not exist (python -m edge opcua-certs)"])
            if cfg.trusted_clients is None or not cfg.trusted_clients.is_dir():
                raise ConfigError([f"opcua.trusted_clients: {cfg.trusted_clients} is not a folder"])
            try:
                await server.load_certificate(str(cfg.certificate))
                await server.load_private_key(str(cfg.private_key))
            except Exception as e:
                raise ConfigError([f"opcua.certificate/private_key: cannot load {cfg.certificate} / "
                                   f"{cfg.private_key}: {type(e).__name__}: {e}"]) from None
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.X509IdentityToken] +
                                       ([ua.AnonymousIdentityToken] if cfg.allow_anonymous else []))
            server.set_certificate_validator(trust.validate)
        return server

    async def _publish(self) -> None:
        async with self._publishing:
            if self._nodes is not None:
                await self._nodes.publish(self.handshake.view())

    # -- methods (on the loop; the handshake's work on the executor) ---------------------------------
    # Each publishes before it answers: when the PLC has the answer, every node already shows its effect
    # (an Acknowledge answered before ResultsPending drops would make a PLC read the same result again).
    async def _start_job(self, parent: ua.NodeId, part_id: ua.Variant, recipe: ua.Variant) -> list[ua.Variant]:
        loop = asyncio.get_running_loop()
        status, text = await loop.run_in_executor(None, self.handshake.start_job, part_id.Value, recipe.Value)
        self.metrics.jobs.labels(status.name.lower()).inc()
        await self._publish()
        return [ua.Variant(int(status), ua.VariantType.Int32), ua.Variant(text, ua.VariantType.String)]

    async def _acknowledge(self, parent: ua.NodeId, counter: ua.Variant) -> list[ua.Variant]:
        status, text = self.handshake.acknowledge(counter.Value)
        await self._publish()
        return [ua.Variant(int(status), ua.VariantType.Int32), ua.Variant(text, ua.VariantType.String)]
