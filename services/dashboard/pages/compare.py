"""Compare: one prompt answered by 2 to 4 adapters and the base model, side by side, all streaming at
once (the service batches the requests of different adapters together)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import streamlit as st

from lorafleet.v1 import inference_pb2
from services.dashboard import sampling, ui
from services.dashboard.api import InferenceApi, ServiceError

RESULTS = "compare.results"
MAX_ADAPTERS = 4


def _stream_one(
    api: InferenceApi,
    index: int,
    messages: list[tuple[str, str]],
    adapter: str,
    model: str,
    params: inference_pb2.SamplingParams,
    out: queue.Queue[tuple[int, str, Any]],
) -> None:
    """Worker thread: push ("text", delta), ("usage", Usage) and finally ("done", ServiceError | None)."""
    error: ServiceError | None = None
    try:
        for chunk in api.chat_stream(messages, adapter=adapter, sampling=params, model=model):
            if chunk.text:
                out.put((index, "text", chunk.text))
            if chunk.HasField("usage"):
                out.put((index, "usage", chunk.usage))
    except ServiceError as e:
        error = e
    out.put((index, "done", error))


def _usage_line(u: inference_pb2.Usage) -> str:
    rate = f" · {u.generated_tokens / u.total_time_s:.1f} tokens/s" if u.total_time_s > 0 else ""
    return f"{u.generated_tokens} tokens · first token {u.time_to_first_token_s * 1000:.0f} ms{rate} · template {u.template}"


def run_comparison(
    labels: list[str],
    adapters: list[str],
    model: str,
    messages: list[tuple[str, str]],
    params: inference_pb2.SamplingParams,
) -> list[dict[str, Any]]:
    """Stream every target into its own column as the deltas arrive; return the finished results."""
    api = ui.inference_api()
    results: list[dict[str, Any]] = [{"label": lab, "text": "", "usage": "", "error": None} for lab in labels]
    cols = st.columns(len(labels))
    boxes = []
    for col, lab in zip(cols, labels):
        with col:
            st.markdown(f"**{lab}**")
            boxes.append((st.empty(), st.empty()))
    out: queue.Queue[tuple[int, str, Any]] = queue.Queue()
    threads = [
        threading.Thread(target=_stream_one, args=(api, i, messages, a, model, params, out), daemon=True)
        for i, a in enumerate(adapters)
    ]
    for t in threads:
        t.start()
    pending = len(threads)
    while pending:
        index, kind, value = out.get()
        r = results[index]
        if kind == "text":
            r["text"] += value
            boxes[index][0].markdown(r["text"] + " ▌")
        elif kind == "usage":
            r["usage"] = _usage_line(value)
        else:
            pending -= 1
            r["error"] = value
            boxes[index][0].markdown(r["text"] if r["text"].strip() else "_(no text)_")
            if value is not None:
                with boxes[index][1].container():
                    ui.show_service_error(value, f"asking {r['label']}")
            elif r["usage"]:
                boxes[index][1].caption(r["usage"])
    for t in threads:
        t.join()
    return results


def show_results(results: list[dict[str, Any]]) -> None:
    cols = st.columns(len(results))
    for col, r in zip(cols, results):
        with col:
            st.markdown(f"**{r['label']}**")
            st.markdown(r["text"] if r["text"].strip() else "_(no text)_")
            if r["error"] is not None:
                ui.show_service_error(r["error"], f"asking {r['label']}")
            elif r["usage"]:
                st.caption(r["usage"])


st.title("Compare")
try:
    models = ui.inference_api().list_models()
except ServiceError as e:
    ui.show_service_error(e, "listing models and adapters")
    st.stop()

left, right = st.columns([3, 1])
with right:
    st.markdown("**Sampling**")
    model = sampling.model_picker(models, "compare.model")
    params = sampling.sampling_controls("compare", temperature=0.0)
with left:
    choices = sampling.targets(models, model)
    adapter_labels = [lab for lab in choices if lab != ui.BASE_MODEL]
    picked = st.multiselect(
        "Adapters (2 to 4)",
        adapter_labels,
        default=adapter_labels[:2],
        max_selections=MAX_ADAPTERS,
        key="compare.adapters",
    )
    with_base = st.checkbox("Also ask the base model", value=True, key="compare.base")
    system = st.text_input("System prompt", "", key="compare.system")
    prompt = st.text_area("Prompt", key="compare.prompt", height=100)
    go = st.button(
        "Compare",
        type="primary",
        icon=":material/compare:",
        key="compare.go",
        disabled=len(picked) < 2 or not prompt.strip(),
    )
    if len(picked) < 2:
        st.caption(f"Pick at least 2 adapters ({len(adapter_labels)} served).")

if go:
    labels = [*picked, *([ui.BASE_MODEL] if with_base else [])]
    messages = ([("system", system)] if system.strip() else []) + [("user", prompt)]
    st.session_state[RESULTS] = run_comparison(
        labels, [choices[lab] for lab in labels], model, messages, params
    )
elif st.session_state.get(RESULTS):
    show_results(st.session_state[RESULTS])
