"""`lorag serve`: uvicorn, with a readiness drain in front of its graceful shutdown.

On SIGTERM the order is what a load balancer needs:

1. `/ready` turns 503 ("draining") at once, while `/ask` keeps being answered for
   `shutdown_drain_s`, so whoever polls readiness stops routing here before the socket closes;
2. uvicorn stops listening and gives admitted requests `shutdown_grace_s` to finish;
3. the lifespan stops the engine, which answers every row already queued, then exits.

SIGINT (Ctrl-C at a terminal) skips the drain; a second signal of either kind skips what is
left of it.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from app.main import create_app
from app.settings import Settings
from app.state import AppState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_s: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_s = drain_s
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        draining = self._drain is not None
        if sig != signal.SIGTERM or draining or self._drain_s <= 0 or self.should_exit:
            if self._drain is not None:
                self._drain.cancel()
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        if self._state.status == "ready":
            self._state.status = "draining"
        log.info("SIGTERM: not ready; answering for %.1f s more, then shutting down", self._drain_s)
        # a timer thread, not the event loop: this runs in a signal handler; uvicorn's main
        # loop polls should_exit every 0.1 s
        self._drain = threading.Timer(self._drain_s, self._end_drain)
        self._drain.daemon = True
        self._drain.start()

    def _end_drain(self) -> None:
        grace = self.config.timeout_graceful_shutdown
        log.info("drain over: no new connections; admitted requests get %s s", grace)
        self.should_exit = True


def serve(settings: Settings) -> str | None:
    """Serve until stopped; returns why, if the service could never become ready."""
    failure: list[str] = []
    server: DrainingServer | None = None

    def on_failure(reason: str) -> None:
        # a service that can never become ready should not linger: stop and say why
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_failure)
    cfg = settings.server
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        log_config=None,  # keep lorag's handler: request ids, optional JSON lines
        access_log=False,  # the request middleware logs each request with its id
        timeout_graceful_shutdown=int(cfg.grace_s),
    )
    server = DrainingServer(config, app.state.lorag, cfg.drain_s)
    server.run()
    return failure[0] if failure else None
