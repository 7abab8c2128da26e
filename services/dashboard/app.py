"""The lorafleet dashboard: jobs, live training charts, adapters, chat and side-by-side comparison.

Run as:
    streamlit run services/dashboard/app.py -- [--trainer-addr HOST:PORT] [--inference-addr HOST:PORT]
        [--trainer-token T] [--inference-token T] [--trainer-tls-ca F] [--inference-tls-ca F]
        [--metrics-port 9103] [--refresh-s 2]
or ``make dashboard`` (against the services at ``LORAFLEET_TRAINER_ADDR`` / ``LORAFLEET_INFERENCE_ADDR``;
``python -m services.demo --keep-running`` starts both and prints them). Every flag has an environment
variable (services/dashboard/settings.py). The dashboard talks to the services only through their
gRPC APIs (services/dashboard/api.py) and exports its own Prometheus metrics (services/dashboard/metrics.py).
"""

from __future__ import annotations

import logging

import streamlit as st

from services.dashboard import metrics, ui
from services.dashboard.api import ServiceError

log = logging.getLogger("lorafleet.dashboard")

st.set_page_config(page_title="lorafleet", page_icon=":material/hub:", layout="wide")
# Once per process however often Streamlit reruns this script (metrics.serve is guarded).
metrics.serve(ui.settings().metrics_port)

PAGES = [
    st.Page("pages/jobs.py", title="Jobs", icon=":material/list_alt:", default=True),
    st.Page("pages/job_detail.py", title="Job detail", icon=":material/monitoring:"),
    st.Page("pages/adapters.py", title="Adapters", icon=":material/extension:"),
    st.Page("pages/chat.py", title="Chat", icon=":material/chat:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/replicas.py", title="Replicas", icon=":material/dns:"),
]

page = st.navigation(PAGES)
with st.sidebar:
    s = ui.settings()
    st.caption(f"Trainer `{s.trainer_addr}` · Inference `{s.inference_addr}`")
try:
    page.run()
except ServiceError as e:  # a page let one through: still a message, not a traceback
    ui.show_service_error(e)
except Exception:  # never a traceback on the page; the log has it
    log.exception("page %s failed", page.title)
    st.error(
        "This page hit an unexpected error; the dashboard's log has the details. "
        "Reload the page to try again."
    )
