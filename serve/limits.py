"""A request-body size limit for the FastAPI app: 413 before an oversized upload is read.

FastAPI and Starlette parse multipart bodies (spooling files to disk) with no total limit, so
the limit is enforced underneath them, at the ASGI level: a declared Content-Length over the
limit is refused at once, and a chunked body is counted as it arrives and refused as soon as it
passes the limit.
"""

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware; the limit is ``app.state.max_upload_bytes`` (set by the replica)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: Any = getattr(scope["app"].state, "max_upload_bytes", None) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            detail = f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            await self._refuse(scope, receive, send, detail)
            return
        received, over = 0, False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                over = True
                raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not over:  # whatever the app answers to a body cut short is replaced by the 413
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over:
            await self._refuse(scope, receive, send, f"request body exceeds the limit of {limit} bytes")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
