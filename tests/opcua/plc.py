"""A PLC simulator on asyncua's client: the handshake exactly as docs/opcua.md tells a PLC programmer.

    connect (Basic256Sha256 SignAndEncrypt, its certificate as user identity)
    StartJob(part, recipe) -> (status, text)
    wait until ResultsPending > 0, read Result.*, Acknowledge(Result.Counter)

Reads are polled like a PLC's cyclic task does (`poll_s`); several values go in one Read request.
Shared by tests/opcua and scripts/bench_opcua.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from edge.opcua.address_space import RESULT_VARS
from edge.opcua.certs import client_uri

NAMESPACE = "urn:edge-inspection:station"
RESULT_NAMES = [name for name, _, _ in RESULT_VARS]


class Plc:
    """One PLC connection. `certs`: the folder opcua-certs made for this client (cert.der, key.pem,
    server.der); None connects without security (a SecurityPolicy None station)."""

    def __init__(self, url: str, certs: Path | None, *, name: str = "plc", identity: str = "certificate",
                 poll_s: float = 0.002, timeout_s: float = 4.0) -> None:
        self.url, self.certs, self.name, self.identity, self.poll_s = url, certs, name, identity, poll_s
        self.client = Client(url, timeout=timeout_s)
        self.client.application_uri = client_uri(name)
        self.client.session_timeout = 30_000
        self.station: Any = None
        self.nodes: dict[str, Any] = {}

    async def connect(self) -> Plc:
        if self.certs is not None:
            cert, key = self.certs / "cert.der", self.certs / "key.pem"
            await self.client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                                           server_certificate=str(self.certs / "server.der"),
                                           mode=ua.MessageSecurityMode.SignAndEncrypt)
            if self.identity == "certificate":
                await self.client.load_client_certificate(str(cert))
                await self.client.load_private_key(key)
        await self.client.connect()
        ns = await self.client.get_namespace_index(NAMESPACE)
        node = self.client.get_node
        self.station = node(f"ns={ns};s=Station")
        for name in ("State", "StateText", "JobsRunning", "ResultsPending", "ResultCounter", "StartJob",
                     "Acknowledge", "Recipes"):
            self.nodes[name] = node(f"ns={ns};s=Station.{name}")
        for name in RESULT_NAMES:
            self.nodes[f"Result.{name}"] = node(f"ns={ns};s=Station.Result.{name}")
        return self

    async def close(self) -> None:
        try:
            await self.client.disconnect()
        except Exception:  # the station is gone already (killed): nothing to close politely
            self.client.disconnect_socket()

    async def read(self, *names: str) -> list[Any]:
        values = await self.client.read_values([self.nodes[n] for n in names])
        return list(values)

    async def state(self) -> int:
        return int((await self.read("State"))[0])

    async def start_job(self, part_id: str, recipe: str = "") -> tuple[int, str]:
        status, text = await self.station.call_method(self.nodes["StartJob"], part_id, recipe)
        return int(status), str(text)

    async def wait_result(self, timeout: float = 10.0) -> dict[str, Any]:
        """The result Result shows once ResultsPending > 0 (not acknowledged yet)."""
        deadline = time.monotonic() + timeout
        while (await self.read("ResultsPending"))[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result within {timeout} s")
            await asyncio.sleep(self.poll_s)
        values = await self.read(*(f"Result.{n}" for n in RESULT_NAMES))
        return dict(zip(RESULT_NAMES, values, strict=True))

    async def acknowledge(self, counter: int) -> tuple[int, str]:
        status, text = await self.station.call_method(self.nodes["Acknowledge"],
                                                      ua.Variant(counter, ua.VariantType.UInt32))
        return int(status), str(text)

    async def cycle(self, part_id: str, recipe: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """One part: StartJob, wait for its result, acknowledge it; returns the result read."""
        status, text = await self.start_job(part_id, recipe)
        if status != 0:
            raise RuntimeError(f"StartJob({part_id!r}, {recipe!r}) refused: {status} {text}")
        result = await self.wait_result(timeout)
        ack, text = await self.acknowledge(result["Counter"])
        if ack != 0:
            raise RuntimeError(f"Acknowledge({result['Counter']}) refused: {ack} {text}")
        return result

    async def wait_state(self, state: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.state() != state:
            if time.monotonic() > deadline:
                text = (await self.read("StateText"))[0]
                raise TimeoutError(f"State is not {state} within {timeout} s: {text}")
            await asyncio.sleep(0.05)


async def connect_when_up(url: str, certs: Path | None, timeout: float = 60.0, **kw: Any) -> Plc:
    """Connect, retrying while the station (re)starts: what a PLC does after the link dropped."""
    deadline = time.monotonic() + timeout
    while True:
        plc = Plc(url, certs, **kw)
        try:
            return await plc.connect()
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
