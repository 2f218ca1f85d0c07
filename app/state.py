"""The typed lifespan state that routes reach through app.state.lorag (see api/deps.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from app.fleet.fleet import Fleet
from app.metrics import Metrics
from app.retrieval.manager import IndexManager
from app.service import RagService
from app.settings import Settings
from app.wiring import Components

# draining: SIGTERM arrived; /ready says 503 but requests are still answered (app/server.py)
Status = Literal["loading", "ready", "draining", "failed", "stopping"]


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    status: Status = "loading"
    error: str | None = None
    components: Components | None = None
    service: RagService | None = None
    indexes: IndexManager | None = None  # named indexes, document updates (api/documents.py)
    fleet: Fleet | None = None  # adapter registrations and the active index (app/fleet)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
