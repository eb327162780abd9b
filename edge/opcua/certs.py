"""Certificates for the OPC UA handshake: `python -m edge opcua-certs --out DIR`.

OPC UA authenticates applications with X.509 certificates (OPC 10000-6 6.2.2): self-signed RSA
keys, the application URI in subjectAltName, key usage for signing and encryption. This writes
one for the station (server) and one per client (the PLC), plus the `trusted/` folder the
station's `opcua.trusted_clients` points at. Only `cryptography` is needed, so the files can be
made on a machine without the `opcua` extra. Private keys are written mode 0600 and never
overwritten (a key already deployed on a PLC must not change under it).

    DIR/server/cert.der, key.pem        -> opcua.certificate, opcua.private_key
    DIR/trusted/<client>.der            -> opcua.trusted_clients (the folder)
    DIR/clients/<client>/cert.der, key.pem, server.der  -> the PLC (its own pair + the station's cert)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_URI = "urn:edge-inspection:station"  # the server's application URI (its certificate says the same)


def client_uri(name: str) -> str:
    return f"urn:edge-inspection:client:{name}"


def make_certificate(common_name: str, uri: str, hosts: list[str], days: int, *,
                     key: rsa.RSAPrivateKey | None = None) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed OPC UA application certificate (RSA 2048, SHA-256) for client and server use."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-inspection")])
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def write_pair(folder: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    """cert.der and key.pem (0600) in `folder`; refuses to replace an existing key."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "key.pem"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists: not overwritten (a deployed key must not change); "
                              f"remove it first to make a new pair")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    (folder / "cert.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))


def make_station_certs(out: Path, clients: list[str], hosts: list[str] | None = None,
                       days: int = 3650) -> dict[str, Path]:
    """Server pair, one pair per client, the trusted/ folder; returns the paths a station config needs."""
    hosts = hosts or [socket.gethostname(), "localhost", "127.0.0.1"]
    server_cert, server_key = make_certificate("edge-inspection station", SERVER_URI, hosts, days)
    write_pair(out / "server", server_cert, server_key)
    trusted = out / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    for name in clients:
        cert, key = make_certificate(f"edge-inspection client {name}", client_uri(name), [], days)
        write_pair(out / "clients" / name, cert, key)
        shutil.copyfile(out / "clients" / name / "cert.der", trusted / f"{name}.der")
        shutil.copyfile(out / "server" / "cert.der", out / "clients" / name / "server.der")
    return {"certificate": out / "server" / "cert.der", "private_key": out / "server" / "key.pem",
            "trusted_clients": trusted}


def load_certificate(path: Path) -> x509.Certificate:
    """DER or PEM; ValueError naming the file otherwise."""
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise ValueError(f"{path}: not a DER or PEM certificate ({e})") from None
