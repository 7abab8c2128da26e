"""Sampling controls shared by the Chat and Compare pages, and the served targets to pick from."""

from __future__ import annotations

import streamlit as st

from lorafleet.v1 import inference_pb2
from services.dashboard import ui


def sampling_controls(
    prefix: str, temperature: float = 0.7, max_new_tokens: int = 64
) -> inference_pb2.SamplingParams:
    """Widgets for every sampling parameter; returns the request's SamplingParams."""
    t = st.slider("Temperature", 0.0, 2.0, temperature, 0.05, key=f"{prefix}.temperature", help="0 = greedy")
    top_p = st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key=f"{prefix}.top_p")
    top_k = st.number_input("Top-k", 0, 1000, 0, 1, key=f"{prefix}.top_k", help="0 = off")
    n = st.number_input(
        "Max new tokens",
        1,
        4096,
        max_new_tokens,
        1,
        key=f"{prefix}.max_new_tokens",
        help="The service caps it.",
    )
    rep = st.slider(
        "Repetition penalty", 1.0, 2.0, 1.0, 0.05, key=f"{prefix}.repetition_penalty", help="1 = off"
    )
    return inference_pb2.SamplingParams(
        temperature=float(t),
        top_p=float(top_p),
        top_k=int(top_k),
        max_new_tokens=int(n),
        repetition_penalty=float(rep),
    )


def targets(models: inference_pb2.ListModelsResponse, model: str) -> dict[str, str]:
    """Display label -> adapter ref ("" = base) of what ``model`` can serve, base first."""
    out = {ui.BASE_MODEL: ""}
    for a in models.adapters:
        if a.state != "failed" and (not model or not a.model or a.model == model):
            out[a.ref] = a.ref
    return out


def template_of(models: inference_pb2.ListModelsResponse, model: str, adapter: str) -> str:
    """The template the service applies for this target (the adapter's manifest or the base's default)."""
    if adapter:
        for a in models.adapters:
            if a.ref == adapter:
                return a.template
        return ""
    for m in models.models:
        if m.name == model or not model:
            return m.template
    return ""


def model_picker(models: inference_pb2.ListModelsResponse, key: str) -> str:
    """A base-model select when the service serves several; its name ("" when it serves one)."""
    names = [m.name for m in models.models]
    if len(names) <= 1:
        return names[0] if names else ""
    return str(st.selectbox("Base model", names, key=key))
