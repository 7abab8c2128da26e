"""The inference command line against real servers: ``lorafleet inference-server`` (the exact command
and stdout contract ``make demo`` relies on), the clients ``chat`` / ``generate`` / ``models`` /
``load`` / ``unload``, SIGTERM draining in-flight streams, and TLS."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from inference_service_utils import (
    InferenceProcess,
    collect,
    greedy,
    health_status,
    publish_adapter,
    serving,
    settings_for,
    stub_for,
)
from inference_utils import save_lora_adapter
from service_process import ROOT

from lorafleet.errors import ConfigError
from lorafleet.v1 import inference_pb2 as pb
from services.inference import client as client_module

integration = pytest.mark.integration

TOKEN = "cli-s3cret"
PROMPT = "The patient reports a headache and"
CLI_SERVER = ["-m", "services.cli", "inference-server"]


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("cli-src")
    root = tmp_path_factory.mktemp("cli-adapters")
    # The same adapter as test_inference_service's "alpha": it does not stop early on PROMPT.
    alpha = save_lora_adapter(
        tiny_llama, src / "alpha", rank=8, seed=0, targets=("q_proj", "v_proj", "o_proj")
    )
    publish_adapter(root, "alpha", alpha, tiny_llama, template="chatml")
    publish_adapter(root, "beta", save_lora_adapter(tiny_llama, src / "beta", rank=4, seed=5), tiny_llama)
    return root


def server_args(tiny_llama: Path, adapters: Path, *extra: str) -> list[str]:
    """What services/demo.py passes, plus the test's limits."""
    return [
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--model",
        f"tiny={tiny_llama}",
        "--adapters-root",
        str(adapters),
        "--scan-interval-s",
        "0.2",
        "--max-new-tokens-cap",
        "1000",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path, adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceProcess]:
    proc = InferenceProcess(
        server_args(tiny_llama, adapters),
        tmp_path_factory.mktemp("cli-logs"),
        entry=CLI_SERVER,
        env={"LORAFLEET_INFERENCE_AUTH_TOKEN": TOKEN},
    )
    proc.start()
    yield proc
    proc.stop()


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m services.cli ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def chat_text(server: InferenceProcess, messages: list[tuple[str, str]], adapter: str, n: int) -> str:
    request = pb.ChatRequest(
        adapter=adapter, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], sampling=greedy(n)
    )
    return str(server.stub.Chat(request, timeout=60).text)


# ---------------------------------------------------------------------------------------------


@integration
def test_server_keeps_the_demo_contract(server: InferenceProcess) -> None:
    """services/demo.py waits for these exact lines, in this order, then health SERVING."""
    log = server.server_log()
    listening = re.search(r"listening on \S+:(\d+)", log)
    metrics = re.search(r"metrics on (\S+)", log)
    ready = re.search(r"^(ready)$", log, re.M)
    assert listening and metrics and ready, log
    assert listening.start() < ready.start() and metrics.start() < ready.start()
    # The fixture's server runs with the default torch_threads=0: CPUs it may use minus one.
    from services.inference.settings import resolve_torch_threads

    threads = re.search(r"^torch threads: (\d+)$", log, re.M)
    assert threads and int(threads.group(1)) == resolve_torch_threads(0), log
    assert server.address.endswith(":" + listening.group(1))
    assert metrics.group(1).startswith("http://127.0.0.1:") and metrics.group(1).endswith("/metrics")
    assert server.channel is not None
    assert (
        health_status(server.channel, "lorafleet.v1.InferenceService")
        == health_pb2.HealthCheckResponse.SERVING
    )
    refs = {a.ref for a in server.stub.ListModels(pb.ListModelsRequest(), timeout=10).adapters}
    assert {"alpha@1", "beta@1"} <= refs
    # demo.py's request: model by name, adapter by ref, one user message.
    reply = server.stub.Chat(
        pb.ChatRequest(
            model="tiny",
            adapter="alpha@1",
            messages=[pb.ChatMessage(role="user", content="hi")],
            sampling=greedy(4),
        ),
        timeout=60,
    )
    assert reply.usage.adapter == "alpha@1" and reply.usage.template == "chatml"


@integration
def test_models_prints_bases_and_adapters(server: InferenceProcess) -> None:
    out = cli("models", "--target", server.address)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(re.match(r"tiny\s+ready\s+none\s+fp32\s+1024\b", line) for line in lines), out.stdout
    rows = {cells[0]: cells for cells in (line.split() for line in lines) if cells and "@" in cells[0]}
    for ref in ("alpha@1", "beta@1"):
        assert rows[ref][1] == "tiny" and rows[ref][2] in ("available", "loaded"), rows[ref]


@integration
def test_chat_one_shot_streams_the_answer_of_the_chat_rpc(server: InferenceProcess) -> None:
    want = chat_text(server, [("system", "Be brief."), ("user", "What hurts?")], "alpha", 12)
    out = cli(
        "chat",
        "--target",
        server.address,
        "--adapter",
        "alpha",
        "--system",
        "Be brief.",
        "--message",
        "What hurts?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    assert "[alpha@1, template chatml:" in out.stderr and "generated tokens" in out.stderr
    base = cli("chat", "--target", server.address, "-m", "What hurts?", "--max-new-tokens", "12", "-q")
    assert base.returncode == 0 and base.stderr == ""
    assert base.stdout == chat_text(server, [("user", "What hurts?")], "", 12) + "\n"
    assert base.stdout != out.stdout


@integration
def test_generate_streams_the_answer_of_the_generate_rpc(server: InferenceProcess) -> None:
    want = server.stub.Generate(
        pb.GenerateRequest(adapter="beta@1", prompt=PROMPT, sampling=greedy(10)), timeout=60
    )
    out = cli("generate", PROMPT, "--target", server.address, "--adapter", "beta@1", "--max-new-tokens", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    assert (
        f"[beta@1: {want.usage.prompt_tokens} prompt + {want.usage.generated_tokens} generated" in out.stderr
    )
    piped = cli(
        "generate",
        "-",
        "--target",
        server.address,
        "--adapter",
        "beta@1",
        "--max-new-tokens",
        "10",
        stdin=PROMPT,
    )
    assert piped.stdout == out.stdout


@integration
def test_chat_repl_keeps_the_conversation_and_resets(server: InferenceProcess) -> None:
    a1 = chat_text(server, [("user", "hello")], "alpha", 8)
    a2 = chat_text(server, [("user", "hello"), ("assistant", a1), ("user", "and then?")], "alpha", 8)
    a3 = chat_text(server, [("user", "and then?")], "alpha", 8)
    assert a2 != a3, "the history does not change the answer; the test proves nothing"
    out = cli(
        "chat",
        "--target",
        server.address,
        "--adapter",
        "alpha",
        "--max-new-tokens",
        "8",
        "-q",
        stdin="hello\n\nand then?\n/reset\nand then?\n/exit\nnever sent\n",
    )
    assert out.returncode == 0, out.stderr
    header = (
        f"chatting with alpha at {server.address}; /reset clears the conversation, /exit or Ctrl-D quits\n"
    )
    assert out.stdout == header + f"> {a1}\n> > {a2}\n> (conversation cleared)\n> {a3}\n> "
    # A failing turn prints the error and the REPL goes on; EOF ends it.
    out = cli(
        "chat",
        "--target",
        server.address,
        "--adapter",
        "alpha",
        "--max-new-tokens",
        "8",
        "--top-p",
        "3",
        stdin="hello\n",
    )
    assert out.returncode == 0
    assert "error: INVALID_ARGUMENT: " in out.stdout and "sampling.top_p=3.0" in out.stdout


@integration
def test_streamed_text_is_written_chunk_by_chunk(server: InferenceProcess) -> None:
    writes: list[tuple[float, str]] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append((time.monotonic(), s))
            return super().write(s)

    argv = [PROMPT, "--target", server.address, "--adapter", "alpha", "--max-new-tokens", "24", "-q"]
    assert client_module.main("generate", argv, out=Recorder()) == 0
    _, ids, _ = collect(
        server.stub.GenerateStream(
            pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(24)), timeout=60
        )
    )
    texts = [s for _, s in writes if s and s != "\n"]
    assert len(ids) == 24
    assert len(texts) >= 8, f"the answer came in {len(texts)} writes, not streamed token by token"


@integration
def test_load_and_unload_need_the_token(server: InferenceProcess) -> None:
    denied = cli("load", "beta", "--target", server.address)
    assert denied.returncode == 2 and "error: UNAUTHENTICATED" in denied.stderr
    token_file = server.log_dir / "client-token"
    token_file.write_text(TOKEN + "\n")
    loaded = cli("load", "beta", "--target", server.address, "--token-file", str(token_file))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "beta@1 on tiny: loaded\n"
    unloaded = cli("unload", "beta@1", "--target", server.address, env={"LORAFLEET_INFERENCE_TOKEN": TOKEN})
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout == "beta@1 on tiny: available\n"
    missing = cli("unload", "ghost", "--target", server.address, "--token-file", str(token_file))
    assert missing.returncode == 2 and "error: NOT_FOUND" in missing.stderr and "'ghost'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["chat", "-m", "hi", "--adapter", "ghost"], ("error: NOT_FOUND", "'ghost'")),
        (["chat", "-m", "hi", "--adapter", "../x"], ("error: INVALID_ARGUMENT", "'../x'")),
        (["generate", "x", "--top-p", "1.5"], ("error: INVALID_ARGUMENT", "sampling.top_p=1.5")),
        (["generate", "x", "--max-new-tokens", "5000"], ("sampling.max_new_tokens=5000", "cap")),
        (["generate", "x", "--model", "gpt-9"], ("error: NOT_FOUND", "model='gpt-9'")),
    ],
    ids=["unknown-adapter", "dotdot", "top-p", "cap", "unknown-model"],
)
@integration
def test_errors_exit_2_with_the_server_message(
    server: InferenceProcess, args: list[str], needles: tuple[str, ...]
) -> None:
    out = cli(*args, "--target", server.address)
    assert out.returncode == 2, (out.stdout, out.stderr)
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


@integration
def test_unreachable_server_is_a_clear_error() -> None:
    out = cli("models", "--target", "127.0.0.1:1", "--timeout", "3")
    assert out.returncode == 2
    assert out.stderr.startswith("error: UNAVAILABLE") or out.stderr.startswith("error: DEADLINE_EXCEEDED")


@integration
def test_sigterm_drains_in_flight_streams(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    """SIGTERM: health NOT_SERVING and new requests refused, while a stream already running goes on
    to its last token; then the process exits 0."""
    proc = InferenceProcess(
        server_args(tiny_llama, adapters, "--shutdown-grace-s", "60"), tmp_path, entry=CLI_SERVER
    ).start()
    assert proc.proc is not None and proc.channel is not None
    try:
        call = proc.stub.GenerateStream(
            pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(1000)), timeout=120
        )
        chunks = iter(call)
        ids = list(next(chunks).token_ids) + list(next(chunks).token_ids)
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "draining" not in proc.server_log():
            assert time.monotonic() < deadline, proc.server_log()
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            proc.stub.Generate(pb.GenerateRequest(prompt="late", sampling=greedy(2)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        usage = None
        for chunk in chunks:
            ids.extend(chunk.token_ids)
            if chunk.HasField("usage"):
                usage = chunk.usage
        assert usage is not None and usage.generated_tokens == len(ids)
        assert usage.total_time_s > 0.5, "the stream ended before SIGTERM could matter"
        assert proc.proc.wait(60) == 0
        log = proc.server_log()
        assert log.index("draining") < log.index("stopped")
    finally:
        proc.stop()


@integration
def test_a_second_sigterm_cancels_in_flight_streams(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    """An operator who cannot wait out the grace period signals again: in-flight streams end at once
    (UNAVAILABLE or CANCELLED, never a hang) and the process still exits 0."""
    proc = InferenceProcess(
        server_args(tiny_llama, adapters, "--shutdown-grace-s", "300"), tmp_path, entry=CLI_SERVER
    ).start()
    assert proc.proc is not None
    try:
        call = proc.stub.GenerateStream(
            pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(1000)), timeout=120
        )
        chunks = iter(call)
        next(chunks)
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "draining" not in proc.server_log():
            assert time.monotonic() < deadline, proc.server_log()
            time.sleep(0.02)
        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            for chunk in chunks:
                assert not chunk.HasField("usage"), (
                    "finished before the second signal; the test proves nothing"
                )
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err.value
        assert proc.proc.wait(30) == 0
        assert time.monotonic() - signalled < 15
        assert "stopped" in proc.server_log()
    finally:
        proc.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command for a test certificate"
)
@integration
def test_tls_server_and_client(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = settings_for(tiny_llama, adapters, tls_cert=str(cert), tls_key=str(key))
    with serving(settings) as srv:
        out = io.StringIO()
        rc = client_module.main(
            "models", ["--target", f"localhost:{srv.port}", "--tls-ca", str(cert)], out=out
        )
        assert rc == 0 and "alpha@1" in out.getvalue()
        out = io.StringIO()
        argv = [
            "-m",
            "hi",
            "--target",
            f"localhost:{srv.port}",
            "--tls-ca",
            str(cert),
            "--max-new-tokens",
            "3",
        ]
        assert client_module.main("chat", argv, out=out) == 0 and out.getvalue().endswith("\n")
        # Plaintext against the TLS port fails cleanly.
        assert client_module.main("models", ["--target", f"127.0.0.1:{srv.port}", "--timeout", "3"]) == 2


@integration
def test_client_stops_the_call_when_the_reader_stops(server: InferenceProcess) -> None:
    """Breaking out of ``InferenceClient.chat_stream`` cancels the RPC (the server frees the row)."""
    with client_module.InferenceClient(server.address) as client:
        stream = client.generate_stream(PROMPT, adapter="alpha", sampling=greedy(1000))
        first = next(stream)
        assert first.token_ids
        stream.close()  # what a `break` in a for loop does
        reply = client.generate(PROMPT, adapter="alpha", sampling=greedy(3))
        assert reply.usage.generated_tokens == 3
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    cancelled = [
        line
        for line in metrics.splitlines()
        if line.startswith("lorafleet_inference_finished_requests_total") and 'reason="cancelled"' in line
    ]
    assert cancelled and float(cancelled[0].rsplit(" ", 1)[1]) >= 1, metrics
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("lorafleet_inference_requests_total{")
        and 'method="GenerateStream"' in line
        and 'code="CANCELLED"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, metrics


# -- flags, environment and YAML of `lorafleet inference-server` (no server started) ----------------


def test_server_flags_override_yaml_which_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.inference.server import build_parser, settings_from_args

    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 6000\nmax_queued: 7\nshutdown_grace_s: 5\nmodels:\n  - {name: a, path: /m/a, quantization: nf4}\n"
    )
    monkeypatch.setenv("LORAFLEET_INFERENCE_MAX_BATCH_SIZE", "3")
    settings = settings_from_args(build_parser().parse_args(["--config", str(config), "--port", "0"]))
    assert (settings.port, settings.max_queued, settings.max_batch_size, settings.shutdown_grace_s) == (
        0,
        7,
        3,
        5,
    )
    assert [(m.name, m.path, m.quantization) for m in settings.models] == [("a", "/m/a", "nf4")]
    flags = ["--model", "b=/m/b:int8", "--model", "c=/m/c", "--dtype", "bf16", "--config", str(config)]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert [(m.name, m.quantization, m.dtype) for m in settings.models] == [
        ("b", "int8", "bf16"),
        ("c", "none", "bf16"),
    ]
    monkeypatch.setenv("LORAFLEET_INFERENCE_MODEL", "d=/m/d,e=/m/e:nf4")
    settings = settings_from_args(build_parser().parse_args([]))
    assert [(m.name, m.quantization) for m in settings.models] == [("d", "none"), ("e", "nf4")]


def test_kv_cache_flags_environment_and_yaml_reach_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.inference.server import build_parser, settings_from_args

    for name in list(os.environ):
        if name.startswith("LORAFLEET_INFERENCE_"):
            monkeypatch.delenv(name)
    defaults = settings_from_args(build_parser().parse_args(["--model", "a=/m/a"]))
    assert (defaults.kv_cache, defaults.kv_cache_mb, defaults.kv_block_size) == ("auto", 0.0, 16)
    assert (defaults.prefix_caching, defaults.max_prefill_tokens) == (True, 512)
    assert defaults.engine_kv_cache_mb is None  # 0: the engine sizes it for max_batch_size sequences
    config = tmp_path / "serve.yaml"
    config.write_text(
        "kv_cache: paged\nkv_cache_mb: 256\nkv_block_size: 32\nprefix_caching: false\n"
        "max_prefill_tokens: 128\nmodels:\n  - {name: a, path: /m/a}\n"
    )
    from_yaml = settings_from_args(build_parser().parse_args(["--config", str(config)]))
    assert (from_yaml.kv_cache, from_yaml.kv_cache_mb, from_yaml.kv_block_size) == ("paged", 256, 32)
    assert (from_yaml.prefix_caching, from_yaml.max_prefill_tokens, from_yaml.engine_kv_cache_mb) == (
        False,
        128,
        256.0,
    )
    flags = ["--config", str(config), "--kv-cache-mb", "512.5", "--kv-block-size", "8", "--prefix-caching"]
    flags += ["--max-prefill-tokens", "64", "--kv-cache", "auto"]
    from_flags = settings_from_args(build_parser().parse_args(flags))
    assert (from_flags.kv_cache, from_flags.kv_cache_mb, from_flags.kv_block_size) == ("auto", 512.5, 8)
    assert (from_flags.prefix_caching, from_flags.max_prefill_tokens) == (True, 64)
    monkeypatch.setenv("LORAFLEET_INFERENCE_KV_CACHE_MB", "1024")
    monkeypatch.setenv("LORAFLEET_INFERENCE_PREFIX_CACHING", "off")
    from_env = settings_from_args(build_parser().parse_args(["--model", "a=/m/a"]))
    assert (from_env.kv_cache_mb, from_env.prefix_caching) == (1024.0, False)
    flag_wins = settings_from_args(build_parser().parse_args(["--model", "a=/m/a", "--prefix-caching"]))
    assert flag_wins.prefix_caching is True
    monkeypatch.setenv("LORAFLEET_INFERENCE_PREFIX_CACHING", "maybe")
    with pytest.raises(ConfigError, match=r"LORAFLEET_INFERENCE_PREFIX_CACHING='maybe': use true or false"):
        settings_from_args(build_parser().parse_args(["--model", "a=/m/a"]))
    monkeypatch.delenv("LORAFLEET_INFERENCE_PREFIX_CACHING")
    monkeypatch.delenv("LORAFLEET_INFERENCE_KV_CACHE_MB")
    config.write_text("prefix_caching: 'no'\nkv_cache_mb: lots\nmodels:\n  - {name: a, path: /m/a}\n")
    with pytest.raises(ConfigError) as bad:
        settings_from_args(build_parser().parse_args(["--config", str(config)]))
    assert "prefix_caching='no': must be true or false" in str(bad.value)
    assert "kv_cache_mb='lots': must be a number >= 0" in str(bad.value)


@integration
def test_the_kv_cache_settings_reach_the_engine(tiny_llama: Path, tmp_path: Path) -> None:
    """Block size, budget, prefill chunk and prefix caching as set, on the engine itself: with prefix
    caching off, a prompt sent twice finds nothing cached."""
    settings = settings_for(
        tiny_llama, tmp_path, kv_cache="paged", kv_cache_mb=3.0, kv_block_size=8, prefix_caching=False
    )
    settings.max_prefill_tokens = 7
    with serving(settings) as srv:
        host = srv.plane.hosts["tiny"]
        engine = host.engine
        assert engine is not None and engine.max_prefill_tokens == 7
        kv = engine.stats()["kv_cache"]
        assert (kv["layout"], kv["block_size"]) == ("paged", 8)
        assert kv["blocks"] == 3 * 2**20 // (host.kv_bytes_per_token * 8)
        assert kv["budget_bytes"] <= 3 * 2**20
        channel, stub = stub_for(srv.port)
        for _ in range(2):
            stub.Generate(pb.GenerateRequest(prompt=PROMPT * 4, sampling=greedy(2)), timeout=60)
        channel.close()
        kv = engine.stats()["kv_cache"]
        assert kv["prefix_query_tokens"] > 0 and kv["prefix_hit_tokens"] == 0
    with serving(settings_for(tiny_llama, tmp_path, kv_cache="padded")) as srv:
        engine = srv.plane.hosts["tiny"].engine
        assert engine is not None and engine.stats()["kv_cache"]["layout"] == "padded"


@integration
def test_a_kv_budget_below_one_sequence_fails_the_start_up(tiny_llama: Path, adapters: Path) -> None:
    """The engine's own message, naming the flag and the value, and exit 2: no traceback, no server
    left running NOT_SERVING on settings that can never work."""
    out = subprocess.run(
        [sys.executable, *CLI_SERVER, *server_args(tiny_llama, adapters, "--kv-cache-mb", "0.01")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert re.search(
        r"^error: base models failed to load: tiny: kv_cache_mb=0\.01 holds \d+ tokens; one sequence of "
        r"max_context=1024 tokens needs at least [\d.]+ MiB$",
        out.stdout,
        re.M,
    ), out.stdout
    assert "ready" not in out.stdout.splitlines()
    assert "Traceback" not in out.stdout + out.stderr, out.stderr


def test_torch_threads_default_leaves_a_cpu_and_honours_a_cgroup_quota(tmp_path: Path) -> None:
    from services.inference.settings import resolve_torch_threads

    cpus = len(os.sched_getaffinity(0))
    absent = tmp_path / "absent"
    assert resolve_torch_threads(3, absent) == 3  # an explicit setting wins
    assert resolve_torch_threads(0, absent) == max(1, cpus - 1)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no quota
    assert resolve_torch_threads(0, cpu_max) == max(1, cpus - 1)
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs -> 2 usable -> 1 thread
    assert resolve_torch_threads(0, cpu_max) == max(1, min(cpus, 2) - 1)
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert resolve_torch_threads(0, cpu_max) == 1
    cpu_max.write_text("garbage")
    assert resolve_torch_threads(0, cpu_max) == max(1, cpus - 1)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ([], ("models=[]", "--model NAME=PATH")),
        (["--model", "nopath"], ("--model='nopath'", "NAME=PATH")),
        (["--model", "t=/m", "--max-batch-size", "0"], ("max_batch_size=0", ">= 1")),
        (
            ["--model", "t=/m", "--tls-cert", "/no/cert.pem"],
            ("tls_key=''", "go together", "tls_cert='/no/cert.pem'"),
        ),
        (["--model", "t=/m", "--shutdown-grace-s", "-1"], ("shutdown_grace_s=-1.0",)),
        (["--model", "t=/m", "--torch-threads", "-2"], ("torch_threads=-2", ">= 0")),
        (["--model", "t=/m", "--kv-cache", "blocks"], ("kv_cache='blocks'", "'auto', 'paged', 'padded'")),
        (["--model", "t=/m", "--kv-cache-mb", "-1"], ("kv_cache_mb=-1.0", ">= 0")),
        (["--model", "t=/m", "--kv-cache-mb", "inf"], ("kv_cache_mb=inf", "finite")),
        (
            ["--model", "t=/m", "--kv-cache", "padded", "--kv-cache-mb", "64"],
            ("kv_cache_mb=64.0", "padded layout has no block budget"),
        ),
        (
            ["--model", "t=/m", "--kv-block-size", "0", "--max-prefill-tokens", "0"],
            ("kv_block_size=0", "max_prefill_tokens=0"),
        ),
        (
            ["--model", "bad name=/m", "--metrics-port", "70000"],
            ("models[0].name='bad name'", "metrics_port=70000"),
        ),
    ],
    ids=[
        "no-model",
        "model-without-path",
        "batch-zero",
        "cert-without-key",
        "negative-grace",
        "negative-threads",
        "kv-cache-layout",
        "negative-kv-budget",
        "infinite-kv-budget",
        "padded-with-budget",
        "kv-block-and-prefill",
        "two-problems",
    ],
)
def test_bad_server_flags_exit_2_naming_every_field(
    argv: list[str],
    needles: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.inference.server import main as server_main

    for name in list(os.environ):
        if name.startswith("LORAFLEET_INFERENCE_"):
            monkeypatch.delenv(name)
    assert server_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid")
    for needle in needles:
        assert needle in err, (needle, err)


def test_every_client_command_is_wired_into_lorafleet_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main as cli_main

    for command in ("inference-server", "chat", "generate", "models", "load", "unload"):
        with pytest.raises(SystemExit) as exit_:
            cli_main([command, "--help"])
        assert exit_.value.code == 0
        assert f"lorafleet {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    top = capsys.readouterr().out
    assert all(c in top for c in ("inference-server", "chat", "generate", "models", "unload"))


def _sample(metrics_url: str, prefix: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@integration
def test_a_killed_client_frees_its_row_at_once(server: InferenceProcess) -> None:
    """``kill -9`` of a streaming ``lorafleet generate``: the server notices the broken connection and
    cancels the request (its batch row and adapter pin) without waiting for the 1000 tokens."""
    cancelled = 'lorafleet_inference_finished_requests_total{model="tiny",reason="cancelled"}'
    running = 'lorafleet_inference_running_requests{model="tiny"}'
    before = _sample(server.metrics_url, cancelled)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "generate",
            PROMPT,
            "--target",
            server.address,
            "--adapter",
            "alpha",
            "--max-new-tokens",
            "1000",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1)  # the stream has started
    started = time.monotonic()
    while _sample(server.metrics_url, running) != 1:  # the gauge follows the engine's steps
        assert proc.poll() is None, "the 1000-token stream ended on its own; the test proves nothing"
        assert time.monotonic() - started < 5.0, "the stream is not in the running batch"
        time.sleep(0.01)
    proc.kill()
    proc.wait(10)
    killed = time.monotonic()
    while _sample(server.metrics_url, cancelled) < before + 1 or _sample(server.metrics_url, running) != 0:
        assert time.monotonic() - killed < 2.0, "the server kept generating for a dead client"
        time.sleep(0.05)
