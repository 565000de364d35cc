"""An ASGI app for uvicorn in the rolling-restart rig: about 2 ms of work per request. uvicorn
(h11) handles SIGTERM itself: it stops accepting and closes idle connections at its next tick,
and finishes in-flight requests."""
import asyncio


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.002)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
