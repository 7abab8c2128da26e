"""Chat with any served adapter or the base model: system prompt, sampling controls, the answer
streaming in token by token, one conversation per target kept for the session, the template shown.

With ``LORAFLEET_INFERENCE_HTTP_ADDR`` set (``--inference-http-addr``), a sidebar choice sends the
chat over the service's OpenAI-compatible HTTP API (the official ``openai`` client, server-sent
events) instead of gRPC: the same plane answers, so the text is the same; the conversation is too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import streamlit as st

from lorafleet.v1 import inference_pb2
from services.dashboard import sampling, ui
from services.dashboard.api import OpenAIChatApi, ServiceError

# session_state key: {"model|adapter": [{"role", "content", "usage"}]}. (No bare strings in a page:
# Streamlit's magic would show them.)
HISTORY = "chat.history"
GRPC, HTTP = "gRPC", "OpenAI HTTP"
"""The transports the page offers (HTTP only with an HTTP address set)."""


@st.cache_resource(show_spinner=False)
def _openai_api(address: str, token: str, tls_ca: str, timeout_s: float) -> OpenAIChatApi:
    return OpenAIChatApi(address, token, tls_ca, timeout_s)


def _usage_caption(usage: dict[str, Any]) -> str:
    parts = [f"{usage['generated_tokens']} tokens", f"first token {usage['ttft_s'] * 1000:.0f} ms"]
    if usage.get("transport"):
        parts.append(f"over {usage['transport']}")
    if usage["total_s"] > 0:
        parts.append(f"{usage['generated_tokens'] / usage['total_s']:.1f} tokens/s")
    parts.append(f"finish: {usage['finish']}")
    if usage["adapter"]:
        parts.append(f"served by {usage['adapter']}")
    if usage["template"]:
        parts.append(f"template {usage['template']}")
    return " · ".join(parts)


def _usage_dict(u: inference_pb2.Usage) -> dict[str, Any]:
    return {
        "generated_tokens": u.generated_tokens,
        "ttft_s": u.time_to_first_token_s,
        "total_s": u.total_time_s,
        "finish": inference_pb2.FinishReason.Name(u.finish_reason).removeprefix("FINISH_REASON_").lower(),
        "adapter": u.adapter,
        "template": u.template,
    }


st.title("Chat")
try:
    models = ui.inference_api().list_models()
except ServiceError as e:
    ui.show_service_error(e, "listing models and adapters")
    st.stop()

with st.sidebar:
    st.markdown("**Chat settings**")
    model = sampling.model_picker(models, "chat.model")
    choices = sampling.targets(models, model)
    label = st.selectbox("Adapter", list(choices), key="chat.adapter", help="Or the base model alone.")
    adapter = choices[label]
    system = st.text_area("System prompt", "", key="chat.system", height=80)
    params = sampling.sampling_controls("chat")
    settings = ui.settings()
    transport = GRPC
    if settings.inference_http_addr:
        transport = str(
            st.radio(
                "Transport",
                [GRPC, HTTP],
                key="chat.transport",
                horizontal=True,
                help=f"{HTTP}: /v1/chat/completions at {settings.inference_http_addr}, streamed (SSE).",
            )
        )

conversation_key = f"{model}|{adapter}"
history: list[dict[str, Any]] = st.session_state.setdefault(HISTORY, {}).setdefault(conversation_key, [])
template = sampling.template_of(models, model, adapter)
head, clear = st.columns([5, 1])
head.caption(
    f"Talking to **{label}**" + (f" on {model}" if model else "") + f" · template **{template or 'unknown'}**"
)
if clear.button("Clear", icon=":material/delete:", key="chat.clear", disabled=not history):
    history.clear()

for turn in history:
    with st.chat_message(turn["role"]):
        st.markdown(turn["content"] if turn["content"].strip() else "_(no text)_")
        if turn.get("usage"):
            st.caption(_usage_caption(turn["usage"]))

prompt = st.chat_input(f"Message {label}", key="chat.input")
if prompt:
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    messages = ([("system", system)] if system.strip() else []) + [(t["role"], t["content"]) for t in history]
    usage: dict[str, Any] = {}

    def deltas() -> Iterator[str]:
        for chunk in ui.inference_api().chat_stream(messages, adapter=adapter, sampling=params, model=model):
            if chunk.HasField("usage"):
                usage.update(_usage_dict(chunk.usage))
            if chunk.text:
                yield chunk.text

    def http_deltas() -> Iterator[str]:
        """The same answer over HTTP: OpenAI's ``model`` is the adapter ref, or the base's name."""
        s = settings
        api = _openai_api(s.inference_http_addr, s.inference_token, s.inference_tls_ca, s.timeout_s)
        target = adapter or model or (models.models[0].name if models.models else "")
        for text, http_usage in api.chat_stream(messages, target, params):
            if http_usage is not None:
                usage.update(http_usage, adapter=adapter, template=template, transport=HTTP)
            if text:
                yield text

    with st.chat_message("assistant"):
        try:
            answer = st.write_stream(http_deltas() if transport == HTTP else deltas())
        except ServiceError as e:
            history.pop()  # the question was not answered: let the user ask again
            ui.show_service_error(e, f"asking {label}")
        else:
            text = answer if isinstance(answer, str) else "".join(map(str, answer))
            history.append({"role": "assistant", "content": text, "usage": usage})
            if not text.strip():
                st.markdown("_(no text)_")
            if usage:
                st.caption(_usage_caption(usage))
