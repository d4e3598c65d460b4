"""A management service on the real broker, run on its own thread, with a raw channel beside it.

For integration tests that speak to ``hostdev-mgmt``'s consumers as agents
would (a pika channel publishing the documented bodies) without starting a
process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
from sqlalchemy import Engine

from hostdev.messages.bus import Bus, BusConfig
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.service import ManagementService


@contextmanager
def service_on_broker(db_url: str, amqp_url: str) -> Iterator[tuple[Engine, Any]]:
    """Runs a service on ``db_url`` and ``amqp_url``; yields its engine and a pika channel."""
    engine = create_database_engine(db_url)
    service = ManagementService(
        MgmtConfig(db_url=db_url, amqp_url=amqp_url),
        Bus(BusConfig(url=amqp_url, queue_type="classic", app_id="hostdev-mgmt")),
        engine, name="it")
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield engine, connection.channel()
    finally:
        connection.close()
        service.stop()
        thread.join(timeout=10)
        service.close()
        engine.dispose()
