"""Tokens for tests: a signing key published to the test's Redis, refresh tokens made with
broker.credentials and access tokens minted the way POST /api/auth/refresh mints them."""

from __future__ import annotations

from dataclasses import dataclass

from combiner.signing import SigningKey


@dataclass
class Issued:
    client_id: str
    refresh_token: str
    token_id: str
    access_token: str

    def metadata(self, name: str = "") -> tuple:
        """What the 1.0.0 client sends on every RPC in API mode (docs/protocol.md §1, §15)."""
        return (
            ("client", self.client_id),
            ("client-id", self.client_id),
            ("name", name or self.client_id),
            ("authorization", f"Bearer {self.access_token}"),
        )


async def publish(broker, key: SigningKey | None = None) -> SigningKey:
    key = key or SigningKey.generate()
    await broker.credentials.publish_key(key.kid, key.public_pem)
    return key


async def issue(
    broker, key: SigningKey, client_id: str, role: str = "client", lifetime: int = 600
) -> Issued:
    refresh, record = await broker.credentials.create(client_id, role)
    access = key.mint(client_id, role, record.id, lifetime)
    return Issued(client_id, refresh, record.id, access.token)
