"""``python -m services.dashboard``: the dashboard, with its Prometheus endpoint up from the start.

``streamlit run services/dashboard/app.py`` works too, but Streamlit runs the app script only when a
browser session opens, so the metrics server (started by the script) would answer only after the first
visit. This launcher starts it first, in the same process, then hands over to Streamlit's own CLI; the
script's ``metrics.serve`` call then finds it running. What ``make dashboard`` runs::

    python -m services.dashboard [--port 8501] [--host 127.0.0.1] [dashboard flags...]

The dashboard flags (``--trainer-addr``, ``--metrics-port``...: services/dashboard/settings.py) and
their environment variables are the same as after ``--`` on a ``streamlit run`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.dashboard import metrics
from services.dashboard.settings import parse_settings

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_argv(port: int, host: str, dashboard_args: Sequence[str]) -> list[str]:
    """The ``streamlit run`` command line (as ``sys.argv``) for the dashboard."""
    return [
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        *dashboard_args,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m services.dashboard",
        description="The lorafleet dashboard (Streamlit). Other flags: services/dashboard/settings.py.",
    )
    ap.add_argument("--port", type=int, default=8501, help="HTTP port of the dashboard")
    ap.add_argument(
        "--host", default="127.0.0.1", help="listen address of the app and its metrics (0.0.0.0: all)"
    )
    known, rest = ap.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    settings = parse_settings(rest)  # flags over environment, as the app reads them
    port = metrics.serve(settings.metrics_port, addr=known.host)
    if port is not None:
        print(f"dashboard metrics on http://{known.host}:{port}/metrics", flush=True)

    from streamlit.web import cli

    sys.argv = streamlit_argv(known.port, known.host, rest)
    try:
        cli.main()  # click: exits through SystemExit
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int | None) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
