"""Jobs: every job with its state, progress and current loss (refreshing), cancel, and the submit form
whose validation errors come from the trainer and show under the fields they are about."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from lorafleet.v1 import trainer_pb2 as pb
from services.dashboard import forms, ui
from services.dashboard.api import ServiceError

# session_state key: ("ok", Job, dry_run) or ("error", ServiceError | str).
SUBMIT_RESULT = "jobs.submit_result"


def _job_rows(jobs: list[pb.Job]) -> pd.DataFrame:
    rows = []
    for j in jobs:
        p = j.progress
        rows.append(
            {
                "job": j.id,
                "state": ui.state_name(j.state),
                "progress": p.percent if p.total_steps else None,
                "step": f"{p.step}/{p.total_steps}" if p.total_steps else "",
                "loss": ui.optional(p, "loss"),
                "eval loss": ui.optional(p, "eval_loss"),
                "tokens/s": ui.optional(p, "tokens_per_s"),
                "method": j.spec.method,
                "stage": j.spec.stage or forms.DEFAULT_STAGE,
                "adapter": j.adapter.ref or j.spec.adapter_name,
                "attempts": len(j.attempts),
                "created": ui.fmt_time(j.created_at),
                "reason": j.reason,
            }
        )
    return pd.DataFrame(rows)


def _cancel(job_id: str) -> None:
    try:
        job = ui.trainer_api().cancel_job(job_id, reason="cancelled from the dashboard")
        st.toast(f"Job {job.id}: {ui.state_name(job.state)}")
    except ServiceError as e:
        st.session_state["jobs.cancel_error"] = e


@st.fragment(run_every=ui.settings().refresh_s)
def job_list() -> None:
    try:
        jobs = ui.trainer_api().list_jobs()
    except ServiceError as e:
        ui.show_service_error(e, "listing jobs")
        return
    if not jobs:
        st.info("No jobs yet. Submit one below.")
        return
    ui.table(
        _job_rows(jobs),
        "jobs-table",
        column_config={
            "progress": st.column_config.ProgressColumn(
                "progress", min_value=0, max_value=100, format="%.0f%%"
            ),
            "loss": st.column_config.NumberColumn("loss", format="%.4f"),
            "eval loss": st.column_config.NumberColumn("eval loss", format="%.4f"),
            "tokens/s": st.column_config.NumberColumn("tokens/s", format="%.0f"),
        },
    )
    ids = [j.id for j in jobs]
    left, right = st.columns(2)
    with left:
        chosen = st.selectbox("Job", ids, key="jobs.selected")
        if st.button("Open job detail", icon=":material/monitoring:", key="jobs.open"):
            st.session_state["detail.open"] = chosen
            st.switch_page("pages/job_detail.py")
    with right:
        active = [j.id for j in jobs if j.state in ui.ACTIVE_STATES]
        if active:
            victim = st.selectbox("Active job", active, key="jobs.cancel_id")
            st.button(
                "Cancel job", icon=":material/cancel:", key="jobs.cancel", on_click=_cancel, args=(victim,)
            )
        else:
            st.caption("No queued or running job to cancel.")
    err = st.session_state.pop("jobs.cancel_error", None)
    if err is not None:
        ui.show_service_error(err, "cancelling")


def _widget_key(path: str) -> str:
    return "form." + path


def _submit(dry_run: bool) -> None:
    """on_click of the form's buttons: runs before the rerun, so the errors show under the fields."""
    values = {path: st.session_state.get(_widget_key(path)) for path in [*forms.FIELDS, forms.STAGE_PATH]}
    try:
        spec = forms.build_spec(values)
        job = ui.trainer_api().submit_job(spec, dry_run=dry_run)
        st.session_state[SUBMIT_RESULT] = ("ok", job, dry_run)
    except ServiceError as e:
        st.session_state[SUBMIT_RESULT] = ("error", e)
    except ValueError as e:  # labels the form could not parse
        st.session_state[SUBMIT_RESULT] = ("error", str(e))


def _field(f: forms.FormField, errors: list[str], options: tuple[str, ...] | None = None) -> None:
    key = _widget_key(f.path)
    with st.container(key="field-" + f.path.replace(".", "-")):
        help_text = f.help or None
        value: Any = f.default
        if f.kind in ("select", "bool"):
            options = options or f.options
            if key in st.session_state:
                # Keep the choice across reruns that change the options (a method list per stage),
                # unless the new list does not have it.
                kept = st.session_state[key]
                del st.session_state[key]
                value = kept if kept in options else value
            index = options.index(value) if value in options else 0
            st.selectbox(f.label, options, index=index, key=key, help=help_text)
        elif f.kind == "int":
            st.number_input(f.label, value=value, step=1, key=key, help=help_text, placeholder="default")
        elif f.kind == "float":
            st.number_input(f.label, value=value, format="%g", key=key, help=help_text, placeholder="default")
        else:
            st.text_input(f.label, value=value or "", key=key, help=help_text, placeholder="default")
        for message in errors:
            st.error(f"`{message}`", icon=":material/error:")


def submit_form() -> None:
    st.subheader("Submit a job")
    result = st.session_state.get(SUBMIT_RESULT)
    field_errors: dict[str, list[str]] = {}
    if result and result[0] == "error" and isinstance(result[1], ServiceError):
        field_errors = result[1].field_errors
    # Outside the form: choosing a stage reruns the page, which then shows that stage's options only.
    _field(forms.STAGE_FIELD, field_errors.get(forms.STAGE_PATH, []))
    stage = st.session_state.get(_widget_key(forms.STAGE_PATH)) or forms.DEFAULT_STAGE
    with st.form("submit_job", border=True):
        for title, fields in forms.SECTIONS:
            on_show = [f for f in fields if forms.visible(f, stage)]
            if not on_show:
                continue
            st.markdown(f"**{title}**" + (f" ({stage})" if any(f.stages for f in on_show) else ""))
            cols = st.columns(4)
            for i, f in enumerate(on_show):
                options = forms.methods_for_stage(stage) if f.path == "method" else None
                with cols[i % 4]:
                    _field(f, field_errors.get(f.path, []), options)
        b1, b2, _ = st.columns([1, 1, 4])
        with b1:
            st.form_submit_button(
                "Submit", type="primary", on_click=_submit, args=(False,), key="form.submit"
            )
        with b2:
            st.form_submit_button("Validate only", on_click=_submit, args=(True,), key="form.validate")
    if not result:
        return
    if result[0] == "ok":
        job, dry_run = result[1], result[2]
        what = "is valid (nothing started)" if dry_run else f"submitted as job **{job.id}**"
        st.success(f"The job {what}. {job.memory_estimate.summary}", icon=":material/check_circle:")
    elif isinstance(result[1], ServiceError):
        err = result[1]
        if err.field_errors:
            shown = {f for f in err.field_errors if f in forms.FIELDS or f == forms.STAGE_PATH}
            others = [f"`{m}`" for f, ms in err.field_errors.items() if f not in shown for m in ms]
            text = f"The trainer refused the job: {sum(map(len, err.field_errors.values()))} problem(s), shown under their fields."
            if others:
                text += " Not in this form: " + "; ".join(others)
            st.error(text, icon=":material/error:")
        else:
            ui.show_service_error(err, "submitting the job")
    else:
        st.error(result[1])


st.title("Jobs")
job_list()
submit_form()
