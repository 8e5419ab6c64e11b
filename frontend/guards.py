"""Request gates that run before any resource: API keys and the drain gate."""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence

import falcon

from frontend.errors import APIError

# Only the APIs are gated (vLLM's /tokenize and /detokenize too); /health stays open
# for launchd scripts and proxies. A tuple: str.startswith takes any of them.
PROTECTED_PREFIX = ("/v1/", "/tokenize", "/detokenize")
# Still answered while draining: an operator watches the stop through them.
DRAIN_EXEMPT = frozenset({"/v1/mlx/status"})


class ApiKeyGate:
    """API keys (``Authorization: Bearer``, or ``x-api-key`` as Anthropic clients send them),
    compared in constant time against every configured key."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def _valid(self, presented: bytes) -> bool:
        ok = False
        for key in self._keys:  # no early exit: timing says nothing about which key
            ok |= hmac.compare_digest(presented, key)
        return ok

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method == "OPTIONS" or not req.path.startswith(PROTECTED_PREFIX):
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else req.get_header("x-api-key") or ""
        if not key or not self._valid(key.encode()):
            raise APIError(
                401,
                "invalid or missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )


class DrainGate:
    """While the supervisor's drain flag exists, new API requests get 503."""

    def __init__(self, flag_path: str | None, retry_after_s: int) -> None:
        self._flag = flag_path
        self._retry_after_s = retry_after_s

    def draining(self) -> bool:
        return bool(self._flag) and os.path.exists(self._flag)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path.startswith(PROTECTED_PREFIX) and req.path not in DRAIN_EXEMPT and self.draining():
            raise APIError(
                503,
                "the server is shutting down; retry on another instance or later",
                code="shutting_down",
                headers={"Retry-After": str(self._retry_after_s)},
            )
