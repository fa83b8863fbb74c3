"""Access tokens: short-lived JWTs signed with an Ed25519 key (EdDSA).

Asymmetric on purpose: Redis holds only the public halves (``P:auth:keys``), so whoever
reads Redis, or runs a replica without the key file, can verify tokens but cannot mint them.
The private key lives in a file (0600) on the replicas that answer /api/auth/refresh; its
key id (``kid``, the first 16 hex digits of the SHA-256 of the raw public key) names it in
every token header, so a new key can be rolled out while tokens signed with the old one still
verify until it is retired (docs/security.md, "Rotating the signing key").
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
ISSUER = "redis-combiner"
DEFAULT_AUDIENCE = "scaleout"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_in: int
    expires_at: float


class SigningKey:
    """The private key that mints access tokens."""

    def __init__(self, private: Ed25519PrivateKey, audience: str = DEFAULT_AUDIENCE) -> None:
        self._private = private
        self.public = private.public_key()
        self.kid = key_id(self.public)
        self.public_pem = public_pem(self.public)
        self.audience = audience

    @classmethod
    def generate(cls, audience: str = DEFAULT_AUDIENCE) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), audience)

    @classmethod
    def load_or_create(cls, path: str | Path, audience: str = DEFAULT_AUDIENCE) -> SigningKey:
        """The key in path (PEM, PKCS#8), created there (mode 0600) if the file is missing."""
        path = Path(path)
        if path.exists():
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
            return cls(private, audience)
        key = cls.generate(audience)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return key

    def mint(self, client_id: str, role: str, token_id: str, lifetime: int) -> AccessToken:
        """An access token for client_id (``sub``), made from refresh token ``token_id``
        (``tid``, what revocation names)."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": self.audience,
            "sub": client_id,
            "role": role,
            "tid": token_id,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._private, algorithm=ALGORITHM, headers={"kid": self.kid})
        return AccessToken(token, lifetime, now + lifetime)
