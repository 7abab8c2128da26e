"""Helpers for the dashboard tests: the real trainer and inference services on loopback ports, the app
under ``AppTest`` (in-process) or ``streamlit run`` (a subprocess, for the browser), and decoders for
what a page rendered (chart data, errors).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
from inference_service_utils import serving, settings_for
from streamlit.testing.v1 import AppTest
from trainer_utils import TERMINAL, TrainerProcess, lora_spec

from lorafleet.v1 import inference_pb2
from lorafleet.v1 import trainer_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "services" / "dashboard" / "app.py"
PAGES = {
    "jobs": "pages/jobs.py",
    "detail": "pages/job_detail.py",
    "adapters": "pages/adapters.py",
    "chat": "pages/chat.py",
    "compare": "pages/compare.py",
}


INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_address() -> str:
    """A loopback address nothing listens on (bound and released: the kernel does not reuse it at once)."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class Stack:
    """Both services, sharing one adapters root, on a tiny base model."""

    model: Path
    data: dict[str, Path]
    adapters_root: Path
    trainer: TrainerProcess
    inference_addr: str = ""
    jobs: dict[str, str] = field(default_factory=dict)
    """adapter name -> id of the job that trained it."""

    def env(self, **override: str) -> dict[str, str]:
        env = {
            "LORAFLEET_TRAINER_ADDR": self.trainer.address,
            "LORAFLEET_INFERENCE_ADDR": self.inference_addr,
            "LORAFLEET_DASHBOARD_METRICS_PORT": "0",
            "LORAFLEET_DASHBOARD_REFRESH_S": "1",
        }
        env.update(override)
        return env

    def submit(self, adapter_name: str, **hyper: Any) -> str:
        """Submit the job that trains and publishes ``adapter_name``, once per stack; its id."""
        if adapter_name not in self.jobs:
            spec = lora_spec(self.model, self.data, **hyper)
            spec.adapter_name = adapter_name
            self.jobs[adapter_name] = self.trainer.stub.SubmitJob(pb.SubmitJobRequest(spec=spec)).id
        return self.jobs[adapter_name]

    def train(self, adapter_name: str, **hyper: Any) -> pb.Job:
        """Train and publish ``adapter_name`` through the trainer API once per stack (cached)."""
        job = self.trainer.wait_for(self.submit(adapter_name, **hyper), TERMINAL, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.reason + job.log_tail
        return job


@contextmanager
def running_stack(root: Path, model: Path, data: dict[str, Path]) -> Iterator[Stack]:
    """A trainer subprocess (two jobs at once) and an in-process inference server over one adapters root."""
    adapters_root = root / "adapters"
    adapters_root.mkdir(parents=True, exist_ok=True)
    trainer = TrainerProcess(root / "state", adapters_root, ["--max-running", "2"]).start()
    try:
        with serving(settings_for(model, adapters_root, max_new_tokens_cap=64)) as server:
            yield Stack(model, data, adapters_root, trainer, inference_addr=f"127.0.0.1:{server.port}")
    finally:
        trainer.stop()


class SlowStreamProxy:
    """A gRPC pass-through to the inference service that holds every message of a server stream for
    ``delay_s``: a slow link, so a browser can see a streamed reply grow however fast the tiny model
    decodes. Unary calls pass straight through; errors keep their status code and message."""

    def __init__(self, target: str, delay_s: float) -> None:
        self.delay_s = delay_s
        self.channel = grpc.insecure_channel(target)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16), handlers=[_Forward(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> SlowStreamProxy:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)
        self.channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: SlowStreamProxy) -> None:
        self.proxy = proxy

    def service(self, details: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        method = INFERENCE_SERVICE.methods_by_name.get(name)
        if method is None or not details.method.startswith(f"/{INFERENCE_SERVICE.full_name}/"):
            return None
        # No (de)serializers: the messages travel as bytes.
        if method.server_streaming:
            stream = self.proxy.channel.unary_stream(details.method)

            def forward_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                try:
                    for message in stream(request, metadata=_auth(context), timeout=context.time_remaining()):
                        time.sleep(self.proxy.delay_s)
                        yield message
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details() or "")

            return grpc.unary_stream_rpc_method_handler(forward_stream)
        unary = self.proxy.channel.unary_unary(details.method)

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return unary(request, metadata=_auth(context), timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
                raise  # not reached: abort raises

        return grpc.unary_unary_rpc_method_handler(forward)


def _auth(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]


def open_page(monkeypatch: Any, env: dict[str, str], page: str = "jobs", timeout: float = 60) -> AppTest:
    """The dashboard under AppTest, pointed at ``env``'s services, on ``page`` (a key of PAGES)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    if page != "jobs":
        at.switch_page(PAGES[page]).run()
    return at


def no_exception(at: AppTest) -> None:
    """A page must never show a traceback."""
    assert not at.exception, [e.value for e in at.exception]


def errors(at: AppTest) -> list[str]:
    return [str(e.value) for e in at.error]


CHARTS = ("chart-loss", "chart-lr", "chart-tokens")
"""Keys of the job-detail page's chart containers."""


def table(at: AppTest, key: str) -> pd.DataFrame:
    """The table shown in the container keyed ``key`` (``ui.table``)."""
    return at.get_by_key(key).dataframe[0].value


def charts(at: AppTest) -> dict[str, tuple[dict[str, Any], pd.DataFrame]]:
    """The job-detail page's Vega-Lite charts by container key: (spec, data); absent ones left out."""
    from streamlit import dataframe_util

    out = {}
    for key in CHARTS:
        try:
            block = at.get_by_key(key)
        except KeyError:
            continue
        for node in block.get("vega_lite_chart"):
            proto = node.proto
            spec = json.loads(proto.spec)
            frames = [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in proto.datasets]
            if proto.HasField("data") and proto.data.data:
                frames.append(dataframe_util.convert_arrow_bytes_to_pandas_df(proto.data.data))
            out[key] = (spec, pd.concat(frames) if frames else pd.DataFrame())
    return out


def wait_until(predicate: Any, timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


@dataclass
class StreamlitProcess:
    """``streamlit run services/dashboard/app.py`` headless on a free port."""

    env: dict[str, str]
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> StreamlitProcess:
        self.port = free_port()
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(APP),
                "--server.headless",
                "true",
                "--server.port",
                str(self.port),
                "--server.address",
                "127.0.0.1",
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
                "--client.toolbarMode",
                "minimal",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited:\n{self.log_path.read_text()}")
            time.sleep(0.3)
        raise TimeoutError(f"streamlit did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
