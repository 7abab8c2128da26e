"""The dashboard's pages under Streamlit's ``AppTest``, against the real trainer (a subprocess) and the
real inference service (in-process) on loopback ports, with the tiny llama. Issue #5, tests item 1.

Every test also checks that no page shows a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from dashboard_utils import (
    PAGES,
    ROOT,
    Stack,
    charts,
    dead_address,
    errors,
    free_port,
    no_exception,
    open_page,
    running_stack,
    table,
    wait_until,
)
from inference_service_utils import collect, greedy, publish_adapter, serving, settings_for
from inference_utils import save_lora_adapter
from prom_utils import promtool_check_metrics
from trainer_utils import TERMINAL, TrainerProcess

from lorafleet.v1 import inference_pb2, inference_pb2_grpc
from lorafleet.v1 import trainer_pb2 as pb
from services.common.field_errors import FieldViolation
from services.dashboard import forms
from services.dashboard import metrics as dash_metrics
from services.dashboard.api import InferenceApi, ServiceError, TrainerApi, field_errors
from services.dashboard.settings import parse_settings

pytestmark = pytest.mark.integration

# The task's own kind of question (the first validation sample): a trained adapter answers it briefly.
QUESTION = (
    "判断临床试验筛选标准的类型：\n年龄≥18周岁\n"
    "选项：疾病，年龄，过敏耐受，治疗或手术，实验室检查，知情同意，妊娠相关，药物\n答："
)


@pytest.fixture(scope="module")
def stack(tiny_llama, bundled_data, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("dash"), tiny_llama, bundled_data) as s:
        yield s


def _fill_form(at, stack: Stack, **values) -> None:
    """Point the submit form at the test's model and data, then apply ``values`` (path -> value)."""
    base = {
        "model.name_or_path": str(stack.model),
        "dataset.train_file": str(stack.data["cblue_train"]),
        "dataset.validation_file": str(stack.data["cblue_validation"]),
        "dataset.format": "columns",
        "dataset.max_source_length": 96,
        "dataset.max_target_length": 8,
        "dataset.max_samples": 160,
        "hyperparameters.num_threads": 1,
    }
    for path, value in {**base, **values}.items():
        at.get_by_key("form." + path).set_value(value)


def _field_errors(at, path: str) -> list[str]:
    """The error messages shown inside the form field of ``path``."""
    return [str(e.value) for e in at.get_by_key("field-" + path.replace(".", "-")).error]


def _metric(at, label: str) -> str:
    return next(str(m.value) for m in at.metric if m.label == label)


# -- Jobs: a bad submission's errors come from the service and sit under their fields -----------------


def test_bad_submission_errors_next_to_fields(stack: Stack, monkeypatch) -> None:
    before = len(stack.trainer.stub.ListJobs(pb.ListJobsRequest()).jobs)
    at = open_page(monkeypatch, stack.env())
    _fill_form(
        at, stack, **{"lora.rank": 0, "hyperparameters.learning_rate": -1.0, "adapter_name": "../evil"}
    )
    at.button(key="form.submit").click().run()
    no_exception(at)

    assert "[1, 1024]" in " ".join(_field_errors(at, "lora.rank"))
    assert "(0, 1)" in " ".join(_field_errors(at, "hyperparameters.learning_rate"))
    assert "'../evil'" in " ".join(_field_errors(at, "adapter_name"))
    # Fields without a problem show none; the summary counts what the service listed.
    assert _field_errors(at, "model.name_or_path") == [] and _field_errors(at, "lora.alpha") == []
    assert any("3 problem(s)" in e for e in errors(at)), errors(at)
    assert len(stack.trainer.stub.ListJobs(pb.ListJobsRequest()).jobs) == before

    # Fixed, "Validate only" is accepted by the service and shows the memory estimate; nothing is queued.
    _fill_form(at, stack, **{"lora.rank": 8, "hyperparameters.learning_rate": 1e-2, "adapter_name": "ok"})
    at.button(key="form.validate").click().run()
    no_exception(at)
    assert _field_errors(at, "lora.rank") == [] and not errors(at), errors(at)
    assert any("is valid" in str(s.value) and "GiB" in str(s.value) for s in at.success)
    assert len(stack.trainer.stub.ListJobs(pb.ListJobsRequest()).jobs) == before


def test_form_builds_the_spec_and_leaves_empty_fields_unset() -> None:
    values = {path: f.default for path, f in forms.FIELDS.items()}
    values.update(
        {
            "method": "qlora",
            "lora.target_modules": "q_proj, v_proj,",
            "labels": "owner=me, exp = a",
            "hyperparameters.predict_with_generate": "yes",
            "deepspeed.zero_stage": "2",
            "ptuning.num_virtual_tokens": 20,
            "hyperparameters.epochs": None,
            "model.dtype": forms.DEFAULT,
        }
    )
    spec = forms.build_spec(values)
    assert (
        spec.method == "qlora"
        and spec.lora.rank == 8
        and list(spec.lora.target_modules) == ["q_proj", "v_proj"]
    )
    assert dict(spec.labels) == {"owner": "me", "exp": "a"} and spec.deepspeed.zero_stage == 2
    assert spec.hyperparameters.predict_with_generate is True and spec.hyperparameters.max_steps == 40
    # Unset stays unset (the server applies the recipe's default); options of another method are not sent.
    assert not spec.hyperparameters.HasField("epochs") and not spec.model.dtype
    assert not spec.HasField("ptuning")
    with pytest.raises(ValueError, match="'oops' is not key=value"):
        forms.build_spec({**values, "labels": "a=b, oops"})


def test_settings_flags_over_environment() -> None:
    env = {
        "LORAFLEET_TRAINER_ADDR": "t:1",
        "LORAFLEET_INFERENCE_ADDR": "i:2",
        "LORAFLEET_DASHBOARD_REFRESH_S": "5",
    }
    s = parse_settings(["--inference-addr", "x:3", "--unknown", "1"], env)
    assert (s.trainer_addr, s.inference_addr, s.refresh_s, s.metrics_port) == ("t:1", "x:3", 5.0, 9103)
    assert parse_settings([], {}).trainer_addr == "127.0.0.1:50051"


def test_field_errors_key_the_trainers_violations_by_form_path() -> None:
    violations = [
        FieldViolation("spec.lora.rank", "spec.lora.rank=0: must be in [1, 1024]"),
        FieldViolation("spec.overrides['train.nope']", "spec.overrides['train.nope']='1': unknown field"),
        FieldViolation("spec.dataset.train_file", "spec.dataset.train_file='/x: y': not found"),
        FieldViolation("spec.lora.rank", "spec.lora.rank=0: second problem"),
    ]
    assert field_errors(violations) == {
        "lora.rank": ["spec.lora.rank=0: must be in [1, 1024]", "spec.lora.rank=0: second problem"],
        "overrides['train.nope']": ["spec.overrides['train.nope']='1': unknown field"],
        "dataset.train_file": ["spec.dataset.train_file='/x: y': not found"],
    }
    assert field_errors([]) == {}


# -- Jobs + Job detail: submit, see it listed, see the charts grow while it trains -------------------------


def test_submit_watch_live_charts(stack: Stack, monkeypatch) -> None:
    at = open_page(monkeypatch, stack.env())
    # 400 steps of about 40 ms, a record every 4 steps: the job trains for several seconds.
    _fill_form(
        at,
        stack,
        **{
            "hyperparameters.max_steps": 400,
            "hyperparameters.logging_steps": 4,
            "hyperparameters.eval_steps": 100,
            "hyperparameters.learning_rate": 1e-2,
            "hyperparameters.lr_scheduler": "cosine",
            "hyperparameters.max_eval_samples": 16,
            "adapter_name": "dash-live",
        },
    )
    at.button(key="form.submit").click().run()
    no_exception(at)
    submitted = [str(s.value) for s in at.success if "submitted as job" in str(s.value)]
    assert submitted, errors(at)
    job_id = re.search(r"job \*\*(\w+)\*\*", submitted[0]).group(1)
    stack.jobs["dash-live"] = job_id

    # The job list shows it with its state.
    jobs = table(at, "jobs-table")
    row = jobs[jobs["job"] == job_id].iloc[0]
    assert row["state"] in ("queued", "running") and row["method"] == "lora"

    # "Open job detail" goes to its charts.
    at.selectbox(key="jobs.selected").set_value(job_id)
    at.button(key="jobs.open").click().run()
    no_exception(at)
    assert at.selectbox(key="detail.select").value == job_id

    def loss_points() -> tuple[int, str]:
        at.run()
        no_exception(at)
        found = charts(at).get("chart-loss")
        n = 0 if found is None else int((found[1]["series"] == "training loss").sum())
        return n, _metric(at, "State")

    first, state = wait_until(lambda: (r := loss_points())[0] >= 2 and r, 120, 0.3, "first loss points")
    assert state == "running", "the job ended before the page saw it run: make it longer"
    grown = wait_until(lambda: (r := loss_points())[0] > first and r, 60, 0.5, "more loss points")
    assert grown[0] > first

    # Axis titles with units, one chart per quantity.
    c = charts(at)
    assert set(c) >= {"chart-loss", "chart-lr", "chart-tokens"}
    titles = {
        k: (spec["encoding"]["x"]["title"], spec["encoding"]["y"]["title"]) for k, (spec, _) in c.items()
    }
    assert titles["chart-loss"] == ("training step", "cross-entropy (nats/token)")
    assert titles["chart-tokens"] == ("training step", "throughput (tokens/s)")
    assert titles["chart-lr"][1] == "learning rate"

    wait_until(lambda: loss_points()[1] == "succeeded", 300, 1.0, "job success")
    c = charts(at)
    loss = c["chart-loss"][1]
    assert set(loss["series"]) == {"training loss", "eval loss"}
    assert loss[loss["series"] == "training loss"]["step"].max() == 400
    assert len(c["chart-lr"][1]) == len(loss[loss["series"] == "training loss"])  # one lr per record
    # Final metrics with the generation scores, the attempts, the memory estimate and the log tail.
    final = table(at, "detail-final-metrics")
    names = set(final["metric"])
    assert {"eval_loss", "train_steps"} <= names and any("bleu" in n for n in names), names
    headline = {m.label for m in at.metric}
    assert any("bleu" in h for h in headline) and any("rouge" in h for h in headline), headline
    attempts = table(at, "detail-attempts")
    assert list(attempts["state"]) == ["succeeded"] and attempts["exit code"].iloc[0] == 0
    assert any("Memory estimate" in str(m.value) for m in at.markdown)
    assert any('"published"' in str(code.value) for code in at.code)


def test_cancel_a_running_job(stack: Stack, monkeypatch) -> None:
    job_id = stack.submit("dash-cancel", max_steps=5000)
    stack.trainer.wait_for(job_id, (pb.JOB_STATE_RUNNING, *TERMINAL), timeout=120)
    at = open_page(monkeypatch, stack.env(), "jobs")
    no_exception(at)
    assert job_id in at.selectbox(key="jobs.cancel_id").options
    at.selectbox(key="jobs.cancel_id").set_value(job_id)
    at.button(key="jobs.cancel").click().run()
    no_exception(at)
    assert not errors(at), errors(at)
    assert stack.trainer.wait_for(job_id, TERMINAL, timeout=60).state == pb.JOB_STATE_CANCELLED

    def listed_state() -> str:
        at.run()
        jobs = table(at, "jobs-table")
        return str(jobs[jobs["job"] == job_id]["state"].iloc[0])

    wait_until(lambda: listed_state() == "cancelled", 10, what="cancelled in the list")
    # The reason says who cancelled it.
    jobs = table(at, "jobs-table")
    assert "dashboard" in jobs[jobs["job"] == job_id]["reason"].iloc[0]


# -- Adapters: published versions with manifests, loaded or not, load / unload --------------------------


def test_adapters_page_load_unload(stack: Stack, monkeypatch) -> None:
    stack.train("dash-lora", max_steps=40)
    at = open_page(monkeypatch, stack.env(), "adapters")
    no_exception(at)
    assert not errors(at), errors(at)
    published = table(at, "adapters-table")
    row = published[published["adapter"] == "dash-lora@1"].iloc[0]
    assert row["method"] == "lora" and row["template"] and row["created"] and len(row["dataset sha256"]) == 12
    assert str(stack.model) in row["base model"] or row["base model"]
    at.selectbox(key="adapters.selected").set_value("dash-lora@1").run()
    manifest = at.json[0].value
    assert '"run_id"' in manifest and '"template"' in manifest

    at.button(key="adapters.load").click().run()
    no_exception(at)
    assert any("dash-lora@1: loaded" in str(s.value) for s in at.success), errors(at)
    served = table(at, "adapters-served")
    assert served[served["adapter"] == "dash-lora@1"]["state"].iloc[0] == "loaded"

    at.button(key="adapters.unload").click().run()
    no_exception(at)
    served = table(at, "adapters-served")
    assert served[served["adapter"] == "dash-lora@1"]["state"].iloc[0] != "loaded"


# -- Chat: a streamed answer from the adapter, history kept, template shown --------------------------------


def _reference_answer(stack: Stack, adapter: str, messages: list[tuple[str, str]], n: int) -> str:
    channel = grpc.insecure_channel(stack.inference_addr)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.ChatRequest(
        adapter=adapter,
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=greedy(n, top_p=1.0, top_k=0, repetition_penalty=1.0),
    )
    text, _, _ = collect(stub.ChatStream(request))
    channel.close()
    return text


def test_chat_streams_the_adapters_answer(stack: Stack, monkeypatch) -> None:
    stack.train("dash-lora", max_steps=40)
    at = open_page(monkeypatch, stack.env(), "chat")
    no_exception(at)
    at.selectbox(key="chat.adapter").set_value("dash-lora@1")
    at.slider(key="chat.temperature").set_value(0.0)
    at.number_input(key="chat.max_new_tokens").set_value(12)
    at.run()
    assert any("template" in str(c.value) for c in at.caption)
    before = dash_metrics.CALLS.labels(service="inference", method="ChatStream", code="OK")._value.get()
    at.chat_input(key="chat.input").set_value(QUESTION).run()
    no_exception(at)
    assert not errors(at), errors(at)

    messages = at.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    answer = "".join(str(md.value) for md in messages[1].markdown)
    expected = _reference_answer(stack, "dash-lora@1", [("user", QUESTION)], 12)
    assert expected.strip() and answer.strip() == expected.strip()
    usage = [str(c.value) for c in messages[1].caption]
    assert usage and "served by dash-lora@1" in usage[0] and "template" in usage[0]
    after = dash_metrics.CALLS.labels(service="inference", method="ChatStream", code="OK")._value.get()
    assert after == before + 1

    # History is kept for the session: a second question shows both exchanges and sends the first as context.
    at.chat_input(key="chat.input").set_value("再说一遍").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    second = "".join(str(md.value) for md in at.chat_message[3].markdown)
    context = [("user", QUESTION), ("assistant", expected), ("user", "再说一遍")]
    reference = _reference_answer(stack, "dash-lora@1", context, 12).strip()
    # An empty reply (the tiny model may answer EOS at once) is shown as a placeholder, not a blank bubble.
    assert second.strip() == (reference or "_(no text)_")

    # The base model is another conversation, with its own (empty) history.
    at.selectbox(key="chat.adapter").set_value("(base model)").run()
    assert len(at.chat_message) == 0


def test_chat_over_the_openai_http_api(stack: Stack, monkeypatch, tmp_path) -> None:
    """With LORAFLEET_INFERENCE_HTTP_ADDR set, the chat page can ask a real inference server over its
    OpenAI-compatible HTTP API (started with an HTTP port): the greedy answer equals gRPC's for the
    same adapter, the usage says which transport served it, and a parameter OpenAI's API lacks is
    refused by name instead of being dropped."""
    source = save_lora_adapter(stack.model, tmp_path / "src", rank=8, seed=5, targets=("q_proj", "v_proj"))
    publish_adapter(tmp_path / "adapters", "http-lora", source, stack.model, template="chatml")
    settings = settings_for(stack.model, tmp_path / "adapters", http_port=0, max_new_tokens_cap=64)
    with serving(settings) as server:
        grpc_addr, http_addr = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.http_port}"
        env = stack.env(LORAFLEET_INFERENCE_ADDR=grpc_addr, LORAFLEET_INFERENCE_HTTP_ADDR=http_addr)
        at = open_page(monkeypatch, env, "chat")
        no_exception(at)
        at.selectbox(key="chat.adapter").set_value("http-lora@1")
        at.slider(key="chat.temperature").set_value(0.0)
        at.number_input(key="chat.max_new_tokens").set_value(12)
        at.radio(key="chat.transport").set_value("OpenAI HTTP").run()
        before = dash_metrics.CALLS.labels(service="inference", method="http:chat.completions", code="OK")
        before_value = before._value.get()
        at.chat_input(key="chat.input").set_value("The patient reports").run()
        no_exception(at)
        assert not errors(at), errors(at)
        answer = "".join(str(md.value) for md in at.chat_message[1].markdown)
        expected = _reference_answer(
            Stack(stack.model, {}, tmp_path, stack.trainer, grpc_addr),
            "http-lora@1",
            [("user", "The patient reports")],
            12,
        )
        assert answer.strip() == (expected.strip() or "_(no text)_")
        usage = [str(c.value) for c in at.chat_message[1].caption]
        assert usage and "over OpenAI HTTP" in usage[0] and "served by http-lora@1" in usage[0], usage
        assert before._value.get() == before_value + 1

        at.number_input(key="chat.top_k").set_value(5)
        at.chat_input(key="chat.input").set_value("Again").run()
        no_exception(at)
        assert any("top_k=5" in e and "OpenAI" in e for e in errors(at)), errors(at)
        at.run()
        assert len(at.chat_message) == 2  # the refused question is not kept


def test_stream_arrives_in_pieces(stack: Stack) -> None:
    """The client yields the deltas as the service sends them, not the whole answer at the end."""
    api = InferenceApi(stack.inference_addr)
    stamps = []
    for chunk in api.chat_stream([("user", QUESTION)], sampling=greedy(24)):
        stamps.append((time.perf_counter(), chunk.text, chunk.HasField("usage")))
    api.close()
    assert len([s for s in stamps if s[1]]) >= 2 and stamps[-1][2]


# -- Compare: two adapters and the base side by side ----------------------------------------------------


def test_compare_two_adapters(stack: Stack, monkeypatch) -> None:
    stack.train("dash-lora", max_steps=40)
    stack.train("dash-lora-b", max_steps=40, learning_rate=3e-2)
    at = open_page(monkeypatch, stack.env(), "compare")
    no_exception(at)
    wait_until(
        lambda: (
            at.run()
            and {"dash-lora@1", "dash-lora-b@1"} <= set(at.multiselect(key="compare.adapters").options)
        ),
        10,
    )
    at.multiselect(key="compare.adapters").set_value(["dash-lora@1", "dash-lora-b@1"])
    at.number_input(key="compare.max_new_tokens").set_value(10)
    at.text_area(key="compare.prompt").set_value(QUESTION)
    at.run()
    at.button(key="compare.go").click().run()
    no_exception(at)
    assert not errors(at), errors(at)
    results = at.session_state["compare.results"]
    assert [r["label"] for r in results] == ["dash-lora@1", "dash-lora-b@1", "(base model)"]
    for r, adapter in zip(results, ["dash-lora@1", "dash-lora-b@1", ""]):
        assert r["error"] is None and "template" in r["usage"]
        assert r["text"].strip() == _reference_answer(stack, adapter, [("user", QUESTION)], 10).strip()
    # The three columns show the three answers after a rerun too.
    at.run()
    shown = " ".join(str(m.value) for m in at.markdown)
    assert all(r["text"].strip()[:5] in shown for r in results if r["text"].strip())


# -- A service that is down or refuses: a clear message, never a traceback; recovery ----------------------


@pytest.mark.parametrize("page", list(PAGES))
def test_service_down_message(page: str, stack: Stack, monkeypatch) -> None:
    env = stack.env(LORAFLEET_TRAINER_ADDR=dead_address(), LORAFLEET_INFERENCE_ADDR=dead_address())
    at = open_page(monkeypatch, env, page)
    no_exception(at)
    text = " ".join(errors(at))
    service = "Inference service" if page in ("chat", "compare") else "Trainer service"
    assert service in text and "is down or unreachable (UNAVAILABLE)" in text, text
    assert "Traceback" not in text


def test_trainer_comes_back(stack: Stack, monkeypatch, tmp_path) -> None:
    port = free_port()
    env = stack.env(LORAFLEET_TRAINER_ADDR=f"127.0.0.1:{port}")
    at = open_page(monkeypatch, env, "jobs")
    assert any("Trainer service at 127.0.0.1:" in e and "UNAVAILABLE" in e for e in errors(at))
    trainer = TrainerProcess(tmp_path / "state", tmp_path / "adapters", ["--port", str(port)]).start()
    try:
        # The same session, the same cached channel: the page recovers once the service answers.
        wait_until(
            lambda: at.run() and not errors(at) and any("No jobs yet" in str(i.value) for i in at.info), 30
        )
        no_exception(at)
    finally:
        trainer.stop()


def test_refused_token_is_explained(stack: Stack, tmp_path, monkeypatch) -> None:
    (tmp_path / "token").write_text("s3cret")
    trainer = TrainerProcess(
        tmp_path / "state", tmp_path / "adapters", ["--auth-token-file", str(tmp_path / "token")]
    )
    trainer.start()
    try:
        env = stack.env(LORAFLEET_TRAINER_ADDR=trainer.address, LORAFLEET_TRAINER_TOKEN="wrong")
        at = open_page(monkeypatch, env, "jobs")
        _fill_form(at, stack)
        at.button(key="form.validate").click().run()
        no_exception(at)
        text = " ".join(errors(at))
        assert "missing or wrong token (UNAUTHENTICATED)" in text and "LORAFLEET_TRAINER_TOKEN" in text, text
    finally:
        trainer.stop()


# -- The dashboard's own metrics --------------------------------------------------------------------------


def _list_jobs_calls(body: str, code: str) -> float:
    series = (
        f'lorafleet_dashboard_grpc_client_calls_total{{code="{code}",method="ListJobs",service="trainer"}} '
    )
    found = re.search(re.escape(series) + r"(\S+)", body)
    return float(found.group(1)) if found else 0.0


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_dashboard_exports_its_grpc_metrics(stack: Stack, monkeypatch) -> None:
    at = open_page(monkeypatch, stack.env(), "jobs")
    port = dash_metrics.bound_port()
    assert port, "metrics server not started"
    before = _scrape(port)
    # Another run of the app (and another session) does not start a second server.
    at.run()
    open_page(monkeypatch, stack.env(LORAFLEET_TRAINER_ADDR=dead_address()), "jobs")
    assert dash_metrics.serve(0) == port
    body = _scrape(port)
    # The rerun listed the jobs once more (the job list fragment); the dead trainer's call failed.
    assert _list_jobs_calls(body, "OK") == _list_jobs_calls(before, "OK") + 1, body
    assert _list_jobs_calls(body, "UNAVAILABLE") == _list_jobs_calls(before, "UNAVAILABLE") + 1, body
    assert (
        'lorafleet_dashboard_grpc_client_call_duration_seconds_bucket{le="0.005",method="ListJobs",service="trainer"}'
        in body
    )
    # Names, types and help texts pass Prometheus' own linter.
    code, problems = promtool_check_metrics(body.encode())
    assert code == 0 and not problems.strip(), problems


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def test_launcher_serves_metrics_before_the_first_visit(stack: Stack, tmp_path) -> None:
    """``python -m services.dashboard`` (what ``make dashboard`` runs): Prometheus can scrape the
    dashboard as soon as it starts, not only once a browser has opened it (as with ``streamlit run``)."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(LORAFLEET_DASHBOARD_METRICS_PORT=str(metrics_port)),
        "PYTHONPATH": str(ROOT),
    }
    with (tmp_path / "dashboard.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.dashboard", "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/_stcore/health") == "ok", 60, what="dashboard up")
        body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "# TYPE lorafleet_dashboard_grpc_client_calls_total counter" in body, body
        assert "lorafleet_dashboard_grpc_client_calls_total{" not in body  # nobody has visited yet
        assert (
            f"dashboard metrics on http://127.0.0.1:{metrics_port}/metrics"
            in (tmp_path / "dashboard.log").read_text()
        )
    finally:
        proc.terminate()
        proc.wait(15)


def test_clients_map_errors(stack: Stack) -> None:
    api = TrainerApi(stack.trainer.address)
    with pytest.raises(ServiceError) as err:
        api.get_job("nope")
    assert (
        err.value.code == "NOT_FOUND"
        and err.value.service == "trainer"
        and "job_id='nope'" in err.value.message
    )
    api.close()
    with pytest.raises(ServiceError) as err:
        TrainerApi("127.0.0.1:1", tls_ca="/nonexistent/ca.pem")
    assert err.value.code == "CLIENT_CONFIG" and "/nonexistent/ca.pem" in str(err.value)
