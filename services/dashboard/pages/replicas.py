"""The inference replicas: for each, the adapters resident in its slots, those running and waiting,
its queue and its KV-cache use, from the same gauges the Gateway API Inference Extension's endpoint
picker reads (``--inference-metrics``: the replicas' /metrics URLs)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from services.dashboard import replicas, ui

st.title("Replicas")
urls = replicas.metrics_urls(ui.settings().inference_metrics)
if not urls:
    st.info(
        "No replicas configured: pass `--inference-metrics URL[,URL...]` (or set "
        "`LORAFLEET_INFERENCE_METRICS`) with each inference replica's /metrics URL."
    )
    st.stop()
_ = st.button("Refresh", icon=":material/refresh:", key="replicas.refresh")  # a click reruns: scrape again
states = [replicas.scrape_replica(url, ui.settings().timeout_s) for url in urls]
rows = [
    {
        "replica": r.url,
        "resident adapters": ", ".join(r.slot_adapters),
        "running": ", ".join(r.running_adapters),
        "waiting": ", ".join(r.waiting_adapters),
        "slots": r.max_lora,
        "requests running": int(r.running),
        "requests waiting": int(r.waiting),
        "KV cache": f"{r.kv_cache_usage:.0%}",
        "error": r.error,
    }
    for r in states
]
ui.table(pd.DataFrame(rows), key="replicas.table")
for r in states:
    if r.error:
        st.warning(f"{r.url}: {r.error}")
