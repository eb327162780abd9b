"""Detached Ed25519 signatures over a model package's package.json.

package.json holds the SHA-256 of every file in the package, so a signature over its exact
bytes covers the whole package: `read_package` then checks each file against those hashes.
Without a signature a package only attests itself (anyone who can write the store can write
matching hashes); with `model.public_key` set the station loads only packages signed by the
holder of the private key (`python -m training export --sign KEY`, or `python -m edge sign`).

`cryptography` is imported lazily: a station without a public key never needs it, and one with
a key gets a PackageError saying what to install instead of an ImportError.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from edge.contract import PACKAGE_JSON
from edge.package import PackageError

SIGNATURE_FILE = PACKAGE_JSON + ".sig"  # base64 of the 64-byte Ed25519 signature, one line


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as e:  # only reachable when a key is configured or a signature is asked for
        raise PackageError("model signatures need the 'cryptography' package: pip install cryptography") from e
    return serialization


def _load_key(path: Path, private: bool) -> Any:
    serialization = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as e:
        raise PackageError(f"{path}: cannot read the Ed25519 {kind} key (PEM expected): {e}") from e
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise PackageError(f"{path}: is a {type(key).__name__}, expected an Ed25519 {kind} key")
    return key


def sign_package(model_dir: str | Path, private_key: str | Path) -> Path:
    """Write MODEL_DIR/package.json.sig (atomically) over the current bytes of package.json."""
    root = Path(model_dir)
    key = _load_key(Path(private_key), private=True)
    sig = base64.b64encode(key.sign((root / PACKAGE_JSON).read_bytes())).decode() + "\n"
    out = root / SIGNATURE_FILE
    tmp = out.with_suffix(".sig.tmp")
    tmp.write_text(sig, encoding="ascii")
    tmp.replace(out)
    return out


def verify_package_signature(model_dir: str | Path, public_key: str | Path) -> None:
    """PackageError unless package.json.sig is a valid signature of package.json under public_key."""
    key = _load_key(Path(public_key), private=False)
    from cryptography.exceptions import InvalidSignature

    root = Path(model_dir)
    sig_path, meta_path = root / SIGNATURE_FILE, root / PACKAGE_JSON
    if not sig_path.is_file():
        raise PackageError(f"{sig_path}: missing; model.public_key {public_key} requires a package signed with "
                           "'python -m training export --sign KEY' or 'python -m edge sign'")
    try:
        sig = base64.b64decode(sig_path.read_text(encoding="ascii").strip(), validate=True)
        key.verify(sig, meta_path.read_bytes())
    except (OSError, UnicodeDecodeError, binascii.Error) as e:
        raise PackageError(f"{sig_path}: unreadable signature: {e}") from e
    except InvalidSignature:
        raise PackageError(f"{sig_path}: not a valid signature of {meta_path} under public key {public_key} "
                           "(package.json changed after signing, or signed with another key)") from None


def generate_keypair(out_dir: str | Path, name: str = "model-signing") -> tuple[Path, Path]:
    """Write OUT/<name>.key (PKCS#8 PEM, mode 0600) and OUT/<name>.pub; never overwrites."""
    serialization = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path
