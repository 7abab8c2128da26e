"""What every page shares: the settings, one cached client per service, the service-error message,
and small formatters. Pages import this; it is the only module besides the pages that imports
Streamlit.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from lorafleet.v1 import trainer_pb2 as pb
from services.dashboard.api import InferenceApi, ServiceError, TrainerApi
from services.dashboard.settings import DashboardSettings, parse_settings

STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in pb.JobState.items()}
ACTIVE_STATES = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
BASE_MODEL = "(base model)"
"""The adapter choice that means no adapter."""

_ENV_OF = {"trainer": "LORAFLEET_TRAINER_ADDR", "inference": "LORAFLEET_INFERENCE_ADDR"}


def settings() -> DashboardSettings:
    """Flags after ``--`` on the ``streamlit run`` line, over the environment (cheap: read each run)."""
    return parse_settings(sys.argv[1:])


@st.cache_resource(show_spinner=False)
def _trainer(address: str, token: str, tls_ca: str, timeout_s: float) -> TrainerApi:
    return TrainerApi(address, token, tls_ca, timeout_s)


@st.cache_resource(show_spinner=False)
def _inference(address: str, token: str, tls_ca: str, timeout_s: float) -> InferenceApi:
    return InferenceApi(address, token, tls_ca, timeout_s)


def trainer_api() -> TrainerApi:
    """The process-wide trainer client (one channel per address); ServiceError on bad TLS settings."""
    s = settings()
    return _trainer(s.trainer_addr, s.trainer_token, s.trainer_tls_ca, s.timeout_s)


def inference_api() -> InferenceApi:
    s = settings()
    return _inference(s.inference_addr, s.inference_token, s.inference_tls_ca, s.timeout_s)


def show_service_error(err: ServiceError, doing: str = "") -> None:
    """One clear message: which service, where, what it said, and what to do; never a traceback."""
    hint = ""
    if err.code == "UNAVAILABLE":
        hint = (
            "Start it (`python -m services.demo --keep-running` starts both services) or point the "
            f"dashboard at it with `--{err.service}-addr` / `{_ENV_OF.get(err.service, '')}`. "
            "This page recovers by itself once the service answers again."
        )
    elif err.code == "UNAUTHENTICATED":
        hint = f"Set the token with `--{err.service}-token` or `LORAFLEET_{err.service.upper()}_TOKEN`."
    elif err.code == "DEADLINE_EXCEEDED":
        hint = "The service may be overloaded; the page tries again on the next refresh."
    lines = [f"**{err.headline}**" + (f" while {doing}" if doing else "") + ".", "", f"`{err.message}`"]
    if hint:
        lines += ["", hint]
    st.error(
        "\n".join(lines), icon=":material/cloud_off:" if err.code == "UNAVAILABLE" else ":material/error:"
    )


def table(df: pd.DataFrame, key: str, **kwargs: Any) -> None:
    """A read-only table in a container keyed ``key`` (Streamlit keeps no key on a read-only
    ``st.dataframe``; the container's key finds it in tests, and styles it as ``.st-key-<key>``)."""
    with st.container(key=key):
        st.dataframe(df, hide_index=True, width="stretch", **kwargs)


def chart(spec: alt.Chart, key: str) -> None:
    """An Altair chart in a container keyed ``key`` (as :func:`table`)."""
    with st.container(key=key):
        st.altair_chart(spec, width="stretch")


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, str(state))


def fmt_time(ts: object) -> str:
    """A protobuf Timestamp as local ``YYYY-MM-DD HH:MM:SS``; empty when unset."""
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return ""
    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def optional(msg: object, name: str) -> float | None:
    """An ``optional`` proto field's value, or None when unset."""
    return getattr(msg, name) if msg is not None and msg.HasField(name) else None  # type: ignore[attr-defined]
