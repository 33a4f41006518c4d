"""The one module that imports PyNaCl (the ``signing`` extra): ed25519 keys, signatures, key files.

Key files are one line of text so they can be read, diffed and pasted:
``edge-runtime-ed25519-private <base64 seed>`` (mode 0600) and
``edge-runtime-ed25519 <base64 public key> key-id=<16 hex>``. The key id is the first 8 bytes of the
SHA-256 of the public key; manifests name the key that signed them by it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from edge_runtime.errors import KeyFileError

PRIVATE_TAG = "edge-runtime-ed25519-private"
PUBLIC_TAG = "edge-runtime-ed25519"


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    path: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    seed: bytes
    path: str = ""

    @property
    def public(self) -> PublicKey:
        return PublicKey(bytes(nacl.signing.SigningKey(self.seed).verify_key))

    def sign(self, message: bytes) -> bytes:
        return nacl.signing.SigningKey(self.seed).sign(message).signature


def generate() -> PrivateKey:
    return PrivateKey(bytes(nacl.signing.SigningKey.generate()))


def write_keypair(key: PrivateKey, prefix: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write PREFIX (private, created 0600 before any byte is written) and PREFIX.pub."""
    priv = Path(prefix)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() and not force:
            raise KeyFileError(f"{p} exists; refusing to overwrite a key (use --force)")
    priv.parent.mkdir(parents=True, exist_ok=True)
    if force:
        priv.unlink(missing_ok=True)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{PRIVATE_TAG} {base64.b64encode(key.seed).decode()}\n")
    pub.write_text(f"{PUBLIC_TAG} {base64.b64encode(key.public.raw).decode()} key-id={key.public.key_id}\n",
                   encoding="ascii")
    return priv, pub


def _read_tagged(path: str | Path, tag: str, what: str) -> bytes:
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read {what} key {p}: {getattr(e, 'strerror', None) or e}") from e
    parts = text.split()
    if len(parts) < 2 or parts[0] != tag:
        other = PRIVATE_TAG if tag == PUBLIC_TAG else PUBLIC_TAG
        hint = f" (this is a {'private' if parts and parts[0] == other else 'different'} key file)"
        raise KeyFileError(f"{p} is not an edge-runtime {what} key: expected a line '{tag} <base64>'{hint}")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except binascii.Error as e:
        raise KeyFileError(f"{p}: the key is not valid base64") from e
    if len(raw) != 32:
        raise KeyFileError(f"{p}: an ed25519 key has 32 bytes, this one {len(raw)}")
    return raw


def read_private(path: str | Path) -> PrivateKey:
    p = Path(path)
    seed = _read_tagged(p, PRIVATE_TAG, "private")
    if p.stat().st_mode & 0o077:
        raise KeyFileError(f"{p} can be read by other users (mode {oct(p.stat().st_mode & 0o777)}); "
                           f"run: chmod 600 {p}")
    return PrivateKey(seed, str(p))


def read_public(path: str | Path) -> PublicKey:
    return PublicKey(_read_tagged(path, PUBLIC_TAG, "public"), str(path))
