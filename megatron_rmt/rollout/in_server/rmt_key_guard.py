"""Loaded by the vLLM server itself (`--middleware rmt_key_guard.KeyGuard`): every route needs
`Authorization: Bearer <key>`, the key being $VLLM_API_KEY.

vLLM's own `--api-key` check guards only paths under `/v1`, so the routes that change or stop
the served policy (`/collective_rpc`, `/pause`, `/resume`, `/update_weights`,
`/init_weight_transfer_engine`, ...) would stay open. This guard runs before every other
middleware and refuses any HTTP request (401) or WebSocket (close 1008) without the key. No
route is exempt: vLLM never calls its own HTTP routes, so `/health`, `/metrics` and CORS
preflights need the key too (the launcher and the trainer's client send it everywhere).

It runs in the server's interpreter, which need not have megatron_rmt installed: serve.py puts
this folder on the server's PYTHONPATH. Standard library only.
"""

import hashlib
import hmac
import os

REFUSAL = b'{"error": "Unauthorized: this server needs its API key on every route"}'


class KeyGuard:
    """A pure ASGI middleware; Starlette builds it as `KeyGuard(app=inner)`."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY")
        if not key:  # fail closed: a guard without a key would let everything through
            raise RuntimeError("rmt_key_guard.KeyGuard needs $VLLM_API_KEY")
        self.digest = _digest(key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._authorised(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send({
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(REFUSAL)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": REFUSAL})
        else:
            await send({"type": "websocket.close", "code": 1008})  # policy violation

    def _authorised(self, scope) -> bool:
        value = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # Compare digests: the time taken says nothing about the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token), self.digest)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()
