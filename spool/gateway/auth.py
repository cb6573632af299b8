"""Bearer API keys, compared in constant time; no key configured means an open API (warned about at start)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fastapi import Request

from spool.gateway.errors import ApiError

ENV_API_KEYS = "SPOOL_API_KEYS"  # comma-separated


def parse_keys(values: Iterable[str]) -> tuple[str, ...]:
    """Keys from flags, env values (comma-separated) or key-file lines; blanks and '#' comments dropped."""
    out: list[str] = []
    for value in values:
        for part in value.replace("\n", ",").split(","):
            key = part.strip()
            if key and not key.startswith("#") and key not in out:
                out.append(key)
    return tuple(out)


class KeyChecker:
    """Checks `Authorization: Bearer KEY` against the configured keys."""

    def __init__(self, keys: Iterable[str]):
        # Digests of equal length: compare_digest then takes the same time whatever the key's length or prefix.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def open(self) -> bool:
        """True when no key is configured: every request is let in."""
        return not self._digests

    def valid(self, presented: str) -> bool:
        """True if `presented` is one of the keys; every key is compared, so the time does not say which."""
        given = hashlib.sha256(presented.encode()).digest()
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(given, digest)
        return found

    async def __call__(self, request: Request) -> None:
        """A FastAPI dependency: 401 in OpenAI's shape unless the request carries a valid key."""
        if self.open:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        if not self.valid(token.strip()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
