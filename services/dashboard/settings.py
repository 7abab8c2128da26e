"""Dashboard settings: service addresses, tokens and TLS, from flags or environment.

Flags come after ``--`` on the ``streamlit run`` line; each has an environment variable, and a flag
wins over its variable::

    streamlit run services/dashboard/app.py -- --trainer-addr 127.0.0.1:50051 --inference-addr 127.0.0.1:50052

==========================  ===================================  ===================
flag                        environment                          default
==========================  ===================================  ===================
``--trainer-addr``          ``LORAFLEET_TRAINER_ADDR``           ``127.0.0.1:50051``
``--trainer-token``         ``LORAFLEET_TRAINER_TOKEN``          (none)
``--trainer-tls-ca``        ``LORAFLEET_TRAINER_TLS_CA``         (plaintext)
``--inference-addr``        ``LORAFLEET_INFERENCE_ADDR``         ``127.0.0.1:50052``
``--inference-token``       ``LORAFLEET_INFERENCE_TOKEN``        (none)
``--inference-tls-ca``      ``LORAFLEET_INFERENCE_TLS_CA``       (plaintext)
``--inference-http-addr``   ``LORAFLEET_INFERENCE_HTTP_ADDR``    (none: the chat page uses gRPC only)
``--inference-metrics``     ``LORAFLEET_INFERENCE_METRICS``      (none: the replicas view is empty)
``--metrics-port``          ``LORAFLEET_DASHBOARD_METRICS_PORT`` ``9103`` (-1 = off, 0 = any free port)
``--refresh-s``             ``LORAFLEET_DASHBOARD_REFRESH_S``    ``2`` (live pages' refresh period)
``--timeout-s``             ``LORAFLEET_DASHBOARD_TIMEOUT_S``    ``10`` (deadline of a unary call)
==========================  ===================================  ===================

The trainer variables are the ones ``lorafleet submit | jobs`` read too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DashboardSettings:
    trainer_addr: str = "127.0.0.1:50051"
    """host:port of the trainer service."""
    trainer_token: str = ""
    """Bearer token the trainer requires for SubmitJob / CancelJob."""
    trainer_tls_ca: str = ""
    """CA file to verify the trainer's TLS certificate; empty = plaintext."""
    inference_addr: str = "127.0.0.1:50052"
    """host:port of the inference service."""
    inference_token: str = ""
    """Bearer token the inference service requires for LoadAdapter / UnloadAdapter."""
    inference_tls_ca: str = ""
    """CA file to verify the inference service's TLS certificate; empty = plaintext."""
    inference_http_addr: str = ""
    """host:port (or an ``http(s)://`` URL) of the inference service's OpenAI-compatible HTTP API
    (``--http-port``); when set, the chat page can talk to it instead of gRPC, with the same token
    and CA file. Empty = gRPC only."""
    inference_metrics: str = ""
    """Comma-separated ``/metrics`` URLs of the inference replicas, for the replicas view (e.g.
    ``http://10.0.0.5:8000/metrics,http://10.0.0.6:8000/metrics``)."""
    metrics_port: int = 9103
    """Port of the dashboard's own Prometheus metrics; -1 = off, 0 = any free port."""
    refresh_s: float = 2.0
    """How often the live pages (job list, job detail) refresh."""
    timeout_s: float = 10.0
    """Deadline of a unary call; submit and adapter loads get at least 60 s."""


_FLAGS: list[tuple[str, str, type]] = [
    ("trainer_addr", "LORAFLEET_TRAINER_ADDR", str),
    ("trainer_token", "LORAFLEET_TRAINER_TOKEN", str),
    ("trainer_tls_ca", "LORAFLEET_TRAINER_TLS_CA", str),
    ("inference_addr", "LORAFLEET_INFERENCE_ADDR", str),
    ("inference_token", "LORAFLEET_INFERENCE_TOKEN", str),
    ("inference_tls_ca", "LORAFLEET_INFERENCE_TLS_CA", str),
    ("inference_http_addr", "LORAFLEET_INFERENCE_HTTP_ADDR", str),
    ("inference_metrics", "LORAFLEET_INFERENCE_METRICS", str),
    ("metrics_port", "LORAFLEET_DASHBOARD_METRICS_PORT", int),
    ("refresh_s", "LORAFLEET_DASHBOARD_REFRESH_S", float),
    ("timeout_s", "LORAFLEET_DASHBOARD_TIMEOUT_S", float),
]


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> DashboardSettings:
    """Settings from ``argv`` (the script's arguments) over ``environ`` over the defaults.

    Unknown arguments are ignored: under ``AppTest`` the process's argv is pytest's.
    """
    env = os.environ if environ is None else environ
    defaults = DashboardSettings()
    ap = argparse.ArgumentParser(prog="lorafleet dashboard", allow_abbrev=False, add_help=False)
    for name, var, kind in _FLAGS:
        default = kind(env[var]) if env.get(var, "") != "" else getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default)
    known, _unknown = ap.parse_known_args(list(argv))
    return DashboardSettings(**vars(known))
