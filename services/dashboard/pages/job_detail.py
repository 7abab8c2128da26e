"""Job detail: live charts of loss / eval loss, learning rate and tokens/s against step (from WatchJob,
refreshing while the job runs); for a preference job (dpo, kto, rm) also the chosen and rejected
rewards with their margin, the preference accuracy and the chosen and rejected log-probs; the memory
estimate, final metrics, the log tail and the attempts."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from lorafleet.v1 import trainer_pb2 as pb
from services.dashboard import ui
from services.dashboard.api import ServiceError

# Log lines kept per job (the page shows the tail).
LOG_LINES = 400
HEADLINE_METRICS = ("bleu", "rouge", "accuracy", "margin")
PERCENT_METRICS = ("bleu", "rouge")
PREFERENCE_VALUES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
"""A preference job's per-step metrics (TRL's names), carried in ``MetricRecord.values``."""


@dataclass
class JobEvents:
    """Everything WatchJob sent so far for one job, kept in the session across refreshes."""

    seq: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    states: list[tuple[str, str, int]] = field(default_factory=list)
    ended: bool = False

    def add(self, ev: pb.JobEvent) -> None:
        self.seq = max(self.seq, ev.seq)
        kind = ev.WhichOneof("event")
        if kind == "metrics":
            m = ev.metrics
            row: dict[str, Any] = {"step": m.step, "attempt": m.attempt, "epoch": m.epoch}
            for name in ("loss", "eval_loss", "learning_rate", "tokens_per_s", "grad_norm"):
                row[name] = ui.optional(m, name)
            for name in PREFERENCE_VALUES:
                if name in m.values:
                    row[name] = m.values[name]
            self.metrics.append(row)
        elif kind == "log":
            prefix = f"[attempt {ev.log.attempt}] " if ev.log.attempt > 1 else ""
            self.logs.append(prefix + ev.log.text.rstrip("\n"))
        elif kind == "state":
            self.states.append((ui.state_name(ev.state.state), ev.state.reason, ev.state.attempt))


def _events(job_id: str) -> JobEvents:
    store: dict[str, JobEvents] = st.session_state.setdefault("detail.events", {})
    return store.setdefault(job_id, JobEvents())


def _line_chart(
    df: pd.DataFrame, columns: dict[str, str], y_title: str, log_scale: bool = False
) -> alt.Chart:
    """Lines of ``columns`` (column -> legend name) against step, points where data is sparse."""
    data = df[["step", *columns]].rename(columns=columns).melt("step", var_name="series", value_name="value")
    data = data.dropna()
    y = alt.Y("value:Q", title=y_title, scale=alt.Scale(type="log") if log_scale else alt.Scale(zero=False))
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="training step"),
            y=y,
            color=alt.Color(
                "series:N", title=None, legend=alt.Legend(orient="top"), scale=alt.Scale(scheme="category10")
            ),
            tooltip=["step:Q", "series:N", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=260)
    )


def _charts(events: JobEvents) -> None:
    if not events.metrics:
        st.info("No metric records yet: the first arrives after the first logging step.")
        return
    df = pd.DataFrame(events.metrics)
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Loss**")
        preference = any(name in df.columns for name in PREFERENCE_VALUES)
        ui.chart(
            _line_chart(
                df,
                {"loss": "training loss", "eval_loss": "eval loss"},
                "preference loss" if preference else "cross-entropy (nats/token)",
            ),
            "chart-loss",
        )
    with c2:
        st.markdown("**Learning rate**")
        ui.chart(_line_chart(df, {"learning_rate": "learning rate"}, "learning rate"), "chart-lr")
    with c3:
        st.markdown("**Throughput**")
        ui.chart(_line_chart(df, {"tokens_per_s": "tokens/s"}, "throughput (tokens/s)"), "chart-tokens")
    if any(name in df.columns for name in PREFERENCE_VALUES):
        _preference_charts(df)
    with st.expander(f"Metric records ({len(df)})"):
        ui.table(df, "detail-records")


def _preference_charts(df: pd.DataFrame) -> None:
    """Rewards and margin, preference accuracy, log-probs: the records of a dpo, kto or rm job."""
    for name in PREFERENCE_VALUES:
        if name not in df.columns:
            df[name] = float("nan")
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Rewards**")
        rewards = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin"}
        ui.chart(_line_chart(df, rewards, "reward (implicit, or the value head's score)"), "chart-rewards")
    with c2:
        st.markdown("**Preference accuracy**")
        accuracy = {"rewards/accuracies": "chosen ranked above rejected"}
        ui.chart(_line_chart(df, accuracy, "fraction of pairs"), "chart-preference-accuracy")
    with c3:
        st.markdown("**Log-probs**")
        logps = {"logps/chosen": "chosen", "logps/rejected": "rejected"}
        ui.chart(_line_chart(df, logps, "log-probability of the answer (nats)"), "chart-logps")


def _summary(job: pb.Job) -> None:
    p = job.progress
    cols = st.columns([1.6, 1, 1, 1, 1, 1])
    cols[0].metric("State", ui.state_name(job.state))
    cols[1].metric("Step", f"{p.step}/{p.total_steps}" if p.total_steps else "-")
    loss = ui.optional(p, "loss")
    cols[2].metric("Loss", f"{loss:.4f}" if loss is not None else "-")
    tps = ui.optional(p, "tokens_per_s")
    cols[3].metric("Tokens/s", f"{tps:.0f}" if tps is not None else "-")
    cols[4].metric(
        "ETA", ui.fmt_duration(ui.optional(p, "eta_s")) if job.state == pb.JOB_STATE_RUNNING else "-"
    )
    cols[5].metric("Attempts", str(len(job.attempts)))
    if p.total_steps:
        st.progress(min(1.0, p.percent / 100), text=f"{p.percent:.0f}% of {p.total_steps} steps")
    if job.reason:
        (st.error if job.state == pb.JOB_STATE_FAILED else st.info)(
            f"{ui.state_name(job.state)}: {job.reason}"
        )
    m = job.memory_estimate
    if m.summary or m.device_bytes_per_process:
        st.markdown(
            f"**Memory estimate** · {ui.fmt_bytes(m.device_bytes_per_process)} per process on "
            f"{m.device or 'device'}, {ui.fmt_bytes(m.host_bytes)} host"
        )
        if m.summary:
            st.caption(m.summary)


def _final_metrics(job: pb.Job) -> None:
    st.markdown("**Final metrics**")
    if not job.final_metrics:
        st.caption("Shown once the job has finished.")
        return
    metrics = dict(sorted(job.final_metrics.items()))
    headline = {k: v for k, v in metrics.items() if any(h in k.lower() for h in HEADLINE_METRICS)}
    if headline:  # the full width: six to a row
        cols = st.columns(6)
        for i, (k, v) in enumerate(headline.items()):
            unit = " %" if any(p in k.lower() for p in PERCENT_METRICS) else ""
            cols[i % len(cols)].metric(k, f"{v:.4g}{unit}")


def _final_table(job: pb.Job) -> None:
    st.markdown("**All final metrics**")
    if not job.final_metrics:
        st.caption("None yet.")
        return
    metrics = dict(sorted(job.final_metrics.items()))
    ui.table(pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}), "detail-final-metrics")


def _attempts(job: pb.Job) -> None:
    st.markdown("**Attempts**")
    if not job.attempts:
        st.caption("None yet (queued).")
        return
    rows = [
        {
            "attempt": a.number,
            "state": a.state,
            "started": ui.fmt_time(a.started_at),
            "finished": ui.fmt_time(a.finished_at),
            "exit code": a.exit_code if a.HasField("exit_code") else None,
            "resumed from step": a.resumed_from_step,
            "launcher": f"{a.launcher} {a.launcher_ref}".strip(),
            "reason": a.reason,
        }
        for a in job.attempts
    ]
    ui.table(pd.DataFrame(rows), "detail-attempts")


@st.fragment(run_every=ui.settings().refresh_s)
def live(job_id: str) -> None:
    api = ui.trainer_api()
    events = _events(job_id)
    try:
        if not events.ended:
            new, ended = api.poll_job_events(job_id, events.seq, wait_s=min(1.0, ui.settings().refresh_s))
            for ev in new:
                events.add(ev)
            events.ended = ended
        job = api.get_job(job_id)
    except ServiceError as e:
        ui.show_service_error(e, f"following job {job_id}")
        return
    stage = f" · stage {job.spec.stage}" if job.spec.stage and job.spec.stage != "sft" else ""
    started = f" from {job.spec.preference.sft_adapter}" if job.spec.preference.sft_adapter else ""
    st.subheader(f"Job {job.id} · {job.spec.method}{stage}{started} · {job.spec.model.name_or_path}")
    _summary(job)
    _charts(events)
    _final_metrics(job)
    left, right = st.columns(2)
    with left:
        _final_table(job)
    with right:
        _attempts(job)
    st.markdown("**Log (tail)**")
    tail = list(events.logs)[-60:] or (job.log_tail.splitlines() if job.log_tail else [])
    st.code("\n".join(tail) or "(no log lines yet)", language=None, height=300)


st.title("Job detail")
try:
    jobs = ui.trainer_api().list_jobs()
except ServiceError as e:
    ui.show_service_error(e, "listing jobs")
    st.stop()
if not jobs:
    st.info("No jobs yet: submit one on the Jobs page.")
    st.stop()
ids = [j.id for j in jobs]
opened = st.session_state.pop("detail.open", None)  # "Open job detail" on the Jobs page
if opened in ids:
    st.session_state["detail.select"] = opened
wanted = st.query_params.get("job")
selected = st.selectbox("Job", ids, index=ids.index(wanted) if wanted in ids else 0, key="detail.select")
st.query_params["job"] = selected
live(selected)
