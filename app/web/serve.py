"""The explorer under uvicorn in a thread of this process (``saelab demo``, the web
benchmark, the browser tests); ``saelab serve`` runs uvicorn in the foreground instead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI


@contextmanager
def serve_in_thread(app: FastAPI, host: str, port: int, *, timeout_s: float = 30
                    ) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (port 0: a free one) in a daemon thread; yields the
    base URL once it listens, and stops it (running the app's shutdown) on the way out.

    uvicorn binds the port itself: its transports then get TCP_NODELAY (a socket made here
    would not, and every small response would wait ~40 ms for a delayed ACK)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="explorer", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the explorer could not listen on {host}:{port} (is the port "
                              "in use? --port chooses another)")
            time.sleep(0.05)
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
