"""Two plain-ASGI middlewares of `loratag serve`: a body-size limit that clients can read, and request metrics.

Plain ASGI rather than FastAPI's ``@app.middleware``, which wraps every request in extra tasks and streams, and
which turns an exception raised while the body is read into a 400.
"""

from __future__ import annotations

import hmac
import json
import time


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared (Content-Length) or streamed (chunked).

    The body is read here, whole, before the app sees it (it is at most ``limit`` bytes). An over-limit body is
    read on and discarded up to ``drain`` bytes before the 413 goes out: a client that sends its whole body before
    it reads the answer (Python's urllib, many others) otherwise meets a closed connection ("connection reset")
    instead of the 413. Past ``drain`` the server answers at once and closes the connection."""

    def __init__(self, app, limit: int, drain: int):
        self.app, self.limit, self.drain = app, limit, max(drain, limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            complete = int(declared) <= self.drain and await self._discard(receive, 0)
            return await self._reject(send, close=not complete)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                complete = not message.get("more_body", False) or await self._discard(receive, size)
                return await self._reject(send, close=not complete)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnects

        return await self.app(scope, replay, send)

    async def _discard(self, receive, size: int) -> bool:
        """Read and drop the rest of the body, up to ``drain`` bytes in all; True if it ended within that."""
        while size <= self.drain:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return size <= self.drain
        return False

    async def _reject(self, send, close: bool):
        body = json.dumps({"detail": f"request body over {self.limit} bytes (the limit, --max-body-bytes)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Observe:
    """Reports each HTTP request's path, status and seconds (the 413s of BodyLimit too)."""

    def __init__(self, app, report):
        self.app, self.report = app, report

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.report(scope["path"], status, time.perf_counter() - start)


def is_admin_route(method: str, path: str) -> bool:
    """The routes that change what is served: POST /v1/adapters and DELETE /v1/adapters/NAME."""
    return (method == "POST" and path == "/v1/adapters") or (method == "DELETE" and path.startswith("/v1/adapters/"))


class Auth:
    """Bearer keys for ``/v1/*``. With user keys set, every ``/v1`` route needs one of them (or an admin key):
    401 without. With any key set, the admin routes need an admin key: 403 with a user key, 401 without.
    ``/healthz``, ``/metrics``, the page and the OpenAPI schema stay open (they carry no texts). Keys are
    compared in constant time (hmac.compare_digest against every key) and never logged."""

    def __init__(self, app, user: list[str], admin: list[str]):
        self.app = app
        self.user = [k.encode() for k in user]
        self.admin = [k.encode() for k in admin]

    @staticmethod
    def _matches(token: bytes, keys: list[bytes]) -> bool:
        ok = False
        for key in keys:  # no early exit: the time taken does not say which key, or how much of one, matched
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or not (self.user or self.admin):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        if is_admin_route(scope["method"], scope["path"]):
            if token and self._matches(token, self.admin):
                return await self.app(scope, receive, send)
            if token and self._matches(token, self.user):
                why = "this key may use adapters, not change them: the admin routes need the admin key"
                if not self.admin:
                    why += " (LORATAG_ADMIN_KEY or --admin-key-file, not set on this server)"
                return await _deny(send, 403, why)
            return await _deny(send, 401, "an admin key is needed: send Authorization: Bearer <key>")
        if not self.user or (token and (self._matches(token, self.user) or self._matches(token, self.admin))):
            return await self.app(scope, receive, send)
        return await _deny(send, 401, "missing or unknown API key: send Authorization: Bearer <key>")


async def _deny(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
