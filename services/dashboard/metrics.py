"""Prometheus metrics of the dashboard process itself: its gRPC calls to the services.

Streamlit re-executes the app script on every interaction, but imports this module once per process;
:func:`serve` is guarded by a module-level lock and flag, so the HTTP server starts at most once per
process however many reruns and sessions there are. The metrics live in their own
:class:`~prometheus_client.CollectorRegistry` (like the trainer's), so they never collide with
another component's metrics in a shared test process.

=====================================================  =========  =====================================
name                                                   type       labels
=====================================================  =========  =====================================
``lorafleet_dashboard_grpc_client_calls_total``        counter    ``service``, ``method``, ``code``
``lorafleet_dashboard_grpc_client_call_duration_seconds``  histogram  ``service``, ``method``
=====================================================  =========  =====================================

``code`` is the gRPC status name (``OK``, ``UNAVAILABLE``, ...). A streaming call is timed from the
request to its last message. The job-detail page polls ``WatchJob`` with a short deadline, so its
polls that saw no new event end as ``DEADLINE_EXCEEDED``: that is the poll ending, not a fault.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger("lorafleet.dashboard")

PREFIX: Final = "lorafleet_dashboard_"
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REGISTRY = CollectorRegistry(auto_describe=True)
CALLS = Counter(
    PREFIX + "grpc_client_calls",
    "gRPC calls the dashboard made, by service, method and final status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    PREFIX + "grpc_client_call_duration_seconds",
    "Time from request to the last response message of the dashboard's gRPC calls.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)

_lock = threading.Lock()
_started = False
_port: int | None = None


def record(service: str, method: str, code: str, seconds: float) -> None:
    """Count one finished call and observe its latency."""
    CALLS.labels(service=service, method=method, code=code).inc()
    LATENCY.labels(service=service, method=method).observe(seconds)


def serve(port: int, addr: str = "0.0.0.0") -> int | None:
    """Start the metrics HTTP server once per process; later calls return the same port.

    Args:
        port: TCP port; 0 picks a free one; a negative port disables the server.
        addr: listen address.

    Returns:
        The bound port, or None when disabled or when the port could not be bound (logged: the
        dashboard keeps working without its metrics rather than failing every page).
    """
    global _started, _port
    with _lock:
        if _started:
            return _port
        _started = True
        if port < 0:
            return None
        try:
            server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
        except OSError as e:
            log.warning("dashboard metrics server not started on %s:%d: %s", addr, port, e)
            return None
        _port = int(server.server_port)
        log.info("dashboard metrics on http://%s:%d/metrics", addr, _port)
        return _port


def bound_port() -> int | None:
    """The port the metrics server listens on, if it was started."""
    return _port
