"""Adapters: every published adapter version with its manifest (from the trainer), which of them the
inference service has loaded, load / unload, and export: merge a LoRA adapter into its base and
publish the merged model as a full-model artifact (the trainer's ExportAdapter)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from lorafleet.v1 import adapters_pb2, inference_pb2
from services.dashboard import ui
from services.dashboard.api import ServiceError

RESULT = "adapters.result"


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))


def _published_rows(
    adapters: list[adapters_pb2.Adapter], served: dict[str, inference_pb2.AdapterStatus] | None
) -> pd.DataFrame:
    rows = []
    for a in adapters:
        status = served.get(a.ref) if served is not None else None
        rows.append(
            {
                "adapter": a.ref,
                "inference": status.state if status else ("unknown" if served is None else "not seen"),
                "base model": a.base_model,
                "method": a.method,
                "template": a.template,
                "metrics": _metrics_text(dict(a.metrics)),
                "dataset sha256": a.dataset_sha256[:12],
                "created": a.created_at,
            }
        )
    return pd.DataFrame(rows)


def _model_for(ref: str, models: inference_pb2.ListModelsResponse | None) -> str:
    """The served base model an adapter belongs to ("" = the server's only model)."""
    if models is None:
        return ""
    names = {m.name for m in models.models}
    for a in models.adapters:
        if a.ref == ref and a.model in names:
            return a.model
    return ""


def _act(action: str, ref: str, model: str) -> None:
    api = ui.inference_api()
    try:
        status = api.load_adapter(ref, model) if action == "load" else api.unload_adapter(ref, model)
        st.session_state[RESULT] = (
            "ok",
            f"{status.ref or ref}: {status.state}" + (f" ({status.reason})" if status.reason else ""),
        )
    except ServiceError as e:
        st.session_state[RESULT] = ("error", e)


def _export(ref: str) -> None:
    # Read the inputs at click time: on_click args would hold the values of the previous run.
    publish_name = str(st.session_state.get("adapters.export_name", ""))
    dtype = str(st.session_state.get("adapters.export_dtype", "bf16"))
    try:
        response = ui.trainer_api().export_adapter(ref, publish_name.strip(), dtype)
        notice = f" Note: {response.notice}" if response.notice else ""
        st.session_state[RESULT] = (
            "ok",
            f"{ref} merged into its base and published as {response.adapter.ref} (full model, {dtype}).{notice}",
        )
    except ServiceError as e:
        st.session_state[RESULT] = ("error", e)


def _kind(adapter: adapters_pb2.Adapter) -> str:
    try:
        return str(json.loads(adapter.manifest_json or "{}").get("kind", ""))
    except json.JSONDecodeError:
        return ""


st.title("Adapters")
published: list[adapters_pb2.Adapter] | None = None
models: inference_pb2.ListModelsResponse | None = None
try:
    published = ui.trainer_api().list_adapters()
except ServiceError as e:
    ui.show_service_error(e, "listing published adapters")
try:
    models = ui.inference_api().list_models()
except ServiceError as e:
    ui.show_service_error(e, "asking which adapters are loaded")

served = {a.ref: a for a in models.adapters} if models is not None else None

st.subheader("Published")
if published is not None:
    if not published:
        st.info("No adapter published yet: a job with an adapter name publishes one when it succeeds.")
    else:
        ui.table(_published_rows(published, served), "adapters-table")
        refs = [a.ref for a in published]
        left, right = st.columns([1, 2])
        with left:
            ref = st.selectbox("Adapter", refs, key="adapters.selected")
            b1, b2 = st.columns(2)
            model = _model_for(ref, models)
            b1.button(
                "Load",
                icon=":material/upload:",
                key="adapters.load",
                on_click=_act,
                args=("load", ref, model),
                disabled=models is None,
            )
            b2.button(
                "Unload",
                icon=":material/download:",
                key="adapters.unload",
                on_click=_act,
                args=("unload", ref, model),
                disabled=models is None,
            )
            with st.expander("Export: merge into the base", icon=":material/merge:"):
                st.caption(
                    "Writes a standalone Hugging Face model (config, safetensors, tokenizer with this "
                    "adapter's chat template) and publishes it as a full-model artifact. A base trained "
                    "quantized is dequantized first, and the result says so."
                )
                st.text_input("Publish as", value=f"{ref.split('@')[0]}-merged", key="adapters.export_name")
                st.selectbox("dtype", ["bf16", "fp16", "fp32"], key="adapters.export_dtype")
                is_lora = _kind(next(a for a in published if a.ref == ref)) == "lora"
                st.button(
                    "Export",
                    icon=":material/merge:",
                    key="adapters.export",
                    on_click=_export,
                    args=(ref,),
                    disabled=not is_lora,
                    help=None if is_lora else "only LoRA adapters merge",
                )
            result = st.session_state.pop(RESULT, None)
            if result and result[0] == "ok":
                st.success(result[1])
            elif result:
                ui.show_service_error(result[1], f"changing {ref}")
        with right:
            chosen = next(a for a in published if a.ref == ref)
            st.markdown(f"**Manifest of {chosen.ref}** · `{chosen.path}`")
            try:
                st.json(json.loads(chosen.manifest_json or "{}"), expanded=1)
            except json.JSONDecodeError:
                st.code(chosen.manifest_json)

st.subheader("Inference service")
if models is not None:
    base_rows = [
        {
            "model": m.name,
            "state": m.state,
            "dtype": m.dtype,
            "quantization": m.quantization,
            "template": m.template,
            "max context": m.max_context,
            "path": m.path,
            "reason": m.reason,
        }
        for m in models.models
    ]
    ui.table(pd.DataFrame(base_rows), "adapters-models")
    served_rows = [
        {
            "adapter": a.ref,
            "state": a.state,
            "base model": a.base_model,
            "rank": a.rank,
            "method": a.method,
            "template": a.template,
            "reason": a.reason,
        }
        for a in models.adapters
    ]
    if served_rows:
        ui.table(pd.DataFrame(served_rows), "adapters-served")
    else:
        st.caption("The inference service sees no adapters under its adapters root.")
