"""Every command in README.md's ``bash`` blocks works as printed.

The commands are read from README.md itself; each test below names the lines it checks, and
``test_every_readme_command_has_a_check`` fails when a line has no check or a check names a line
the README no longer shows. How each one is checked:

- run as printed, in a scratch copy of the layout it expects (``examples/``, ``.cache/data``):
  ``make assets``, ``estimate``, ``check-data``, ``adapters``, and the trainer's ``trainer-server``,
  ``submit``, ``jobs``, ``watch`` and ``cancel`` (a real server; its only job stays queued, is
  cancelled and watched, so nothing trains);
- long-running ones with ``--help`` appended: argparse parses every flag before it, then exits, so a
  renamed or mistyped flag fails (the servers, ``train``, the benchmark). ``train`` also runs here
  for 2 steps on the test model; ``make demo`` runs end to end in tests/test_demo_task.py, the
  inference server and its clients in tests/test_inference_cli.py (through this same entry point);
- the inference clients as printed, against an address where nothing listens: they must get as far
  as the connection (exit 2 with ``UNAVAILABLE``, not a usage error);
- what needs a Docker engine or a cluster (``make images``, ``kubectl``) as far as it can go here:
  ``make -n`` for the images, the manifests for the objects the kubectl lines name.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from services import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STAMP = ".venv/.installed"
"""make's setup stamp: ``make -o STAMP`` runs a target's own recipe without reinstalling anything."""

F = TypeVar("F", bound=Callable[..., Any])
CHECKED: dict[str, str] = {}
"""README command -> the test that checks it."""


def checks(*lines: str) -> Callable[[F], F]:
    """Register the README command lines a test checks."""

    def register(fn: F) -> F:
        for line in lines:
            assert line not in CHECKED, f"{line!r} is checked twice"
            CHECKED[line] = fn.__name__
        return fn

    return register


def _without_comment(line: str) -> str:
    """The line up to its first ``#`` that starts a shell comment (not one inside quotes)."""
    for found in re.finditer(r"\s#", line):
        head = line[: found.start()]
        try:
            shlex.split(head)
        except ValueError:  # inside quotes
            continue
        return head
    return line


def readme_commands() -> list[str]:
    """The commands of README.md's ``bash`` blocks: continuations joined, comments and a trailing
    ``&`` dropped, spaces collapsed."""
    commands, block, pending = [], False, ""
    for raw in README.read_text(encoding="utf-8").splitlines():
        text = raw.strip()
        if text.startswith("```"):
            block = text == "```bash"
            continue
        if not block or not text:
            continue
        pending += " " + _without_comment(text)
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        command = " ".join(pending.split()).removesuffix("&").strip()
        commands.append(command)
        pending = ""
    return commands


def argv_of(line: str) -> list[str]:
    """The arguments after ``lorafleet`` (``.venv/bin/lorafleet`` or ``lorafleet``) in a README line."""
    words = shlex.split(line)
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value before the command: its environment
        words.pop(0)
    assert Path(words[0]).name == "lorafleet", line
    return words[1:]


def run_lorafleet(line: str, cwd: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A README ``lorafleet`` line through the entry point in a fresh process, from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv_of(line), *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def help_parses(line: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a long-running line with ``--help`` appended; the flags before it must parse."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv_of(line), "--help"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    return out


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A scratch directory laid out as the README expects after ``make assets``: the examples and the
    bundled datasets (the tiny model comes from the test fixture where one is needed)."""
    from lorafleet.datagen import generate_datasets

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    generate_datasets(str(tmp_path / ".cache" / "data"))
    return tmp_path


def test_the_readme_commands_are_read() -> None:
    commands = readme_commands()
    assert "make demo" in commands and ".venv/bin/lorafleet jobs" in commands
    assert not [c for c in commands if "#" in c or c.endswith(("&", "\\"))]


def test_every_readme_command_has_a_check() -> None:
    assert sorted(readme_commands()) == sorted(CHECKED)


# -- make ------------------------------------------------------------------------------------------


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-o", STAMP, f"PY={sys.executable}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@checks("make demo", "make test")
def test_make_demo_and_make_test_run_the_entry_point_and_the_suite() -> None:
    """``make -n``: what the targets run. The demo itself runs in tests/test_demo_task.py; ``make test``
    is this suite (CI's .ci/run)."""
    demo = _make("-n", "demo")
    assert demo.returncode == 0 and f"{sys.executable} -m services.cli demo" in demo.stdout
    test = _make("-n", "-o", "tools", "test")
    assert test.returncode == 0 and f"{sys.executable} -m pytest" in test.stdout


@pytest.mark.integration
@checks("make assets")
def test_make_assets_builds_the_data_and_the_tiny_model_the_demo_uses() -> None:
    """Run for real in the repository (``.cache`` is where the demo reads from; a finished build is
    reused, so this and the demo test build the tiny llama once between them)."""
    made = _make("assets")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    assert "unrecognized arguments" not in made.stderr
    assert (ROOT / ".cache" / "data" / "cblue_train.jsonl").is_file()
    tiny = ROOT / ".cache" / "tiny" / "llama"
    weights = tiny / "model.safetensors"
    before = weights.stat().st_mtime_ns
    from lorafleet.tiny import build_tiny_model
    from services import demo

    assert tiny == demo.TINY
    build_tiny_model(str(tiny), arch="llama", pretrain_steps=300)  # the demo's own call: no rebuild
    assert weights.stat().st_mtime_ns == before


@checks("make images REGISTRY=registry.example.com/lorafleet/ IMAGE_TAG=0.1.0")
def test_make_images_builds_every_service_image() -> None:
    """No Docker engine here: ``make -n`` shows the four builds with the registry and tag given."""
    made = _make("-n", "images", "REGISTRY=registry.example.com/lorafleet/", "IMAGE_TAG=0.1.0")
    assert made.returncode == 0, made.stderr
    tags = re.findall(r"-t (\S+) \.$", made.stdout, re.M)
    assert tags == [
        f"registry.example.com/lorafleet/{name}:0.1.0"
        for name in (
            "lorafleet-trainer",
            "lorafleet-trainer-worker",
            "lorafleet-inference",
            "lorafleet-dashboard",
        )
    ]


# -- quick start -----------------------------------------------------------------------------------


@checks(
    ".venv/bin/lorafleet train examples/lora.yaml",
    ".venv/bin/lorafleet train examples/lora.yaml train.learning_rate=1e-3 lora.rank=32",
)
def test_train_lines_parse_and_their_config_loads(capsys: pytest.CaptureFixture[str]) -> None:
    """A full run of the example takes minutes: the flags parse, the config and overrides validate
    (what ``train`` does before anything else). ``test_train_runs_the_recipe`` below runs one."""
    from lorafleet.config import load_config

    for line in (
        ".venv/bin/lorafleet train examples/lora.yaml",
        ".venv/bin/lorafleet train examples/lora.yaml train.learning_rate=1e-3 lora.rank=32",
    ):
        assert "usage: lorafleet train" in help_parses(line, capsys)
        config_path, *overrides = argv_of(line)[1:]
        config = load_config(str(ROOT / config_path), overrides)
        assert config.method == "lora"
    assert config.lora.rank == 32 and config.train.learning_rate == 1e-3


@pytest.mark.integration
def test_train_runs_the_recipe(checkout: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lorafleet train examples/lora.yaml`` with overrides for 2 steps on the test model: the entry
    point runs the recipe in this process (one process, no DeepSpeed) and it publishes."""
    monkeypatch.chdir(checkout)
    overrides = [
        f"model.name_or_path={tiny_llama}",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        "train.predict_with_generate=false",
        "data.max_samples=16",
        "output.adapter_name=readme-train",
        f"output.adapters_root={checkout / 'adapters'}",
        f"output.run_dir={checkout / 'run'}",
    ]
    assert cli.main(["train", "examples/lora.yaml", *overrides]) == 0
    assert list((checkout / "adapters" / "readme-train").glob("*/lorafleet_manifest.json"))


QWEN2_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
"""Qwen/Qwen2-7B-Instruct's config.json (the sizes the estimate reads), as published on the hub."""


@checks(".venv/bin/lorafleet estimate examples/qwen2_7b_qlora_gpu.yaml")
def test_estimate_reads_only_the_model_config(checkout: Path, tmp_path: Path) -> None:
    """As printed, offline, with only Qwen2-7B's config.json in the hub cache: no weights needed."""
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2-7B-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN2_7B_CONFIG))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    line = ".venv/bin/lorafleet estimate examples/qwen2_7b_qlora_gpu.yaml"
    done = run_lorafleet(line, checkout, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GiB" in done.stdout or "GB" in done.stdout, done.stdout


@checks(".venv/bin/lorafleet check-data examples/lora.yaml", ".venv/bin/lorafleet adapters")
def test_check_data_and_adapters_run_as_printed(checkout: Path, tiny_llama: Path) -> None:
    checked = run_lorafleet(".venv/bin/lorafleet check-data examples/lora.yaml", checkout)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert ".cache/data/cblue_train.jsonl: 800 valid rows, 0 bad" in checked.stdout
    empty = run_lorafleet(".venv/bin/lorafleet adapters", checkout)
    assert empty.returncode == 0 and empty.stdout == "", empty.stderr


# -- the trainer service ---------------------------------------------------------------------------

TRAINER_LINES = (
    ".venv/bin/lorafleet trainer-server --port 50051 --metrics-port 9101",
    ".venv/bin/lorafleet submit examples/lora.yaml train.epochs=2",
    ".venv/bin/lorafleet jobs",
    ".venv/bin/lorafleet watch JOB_ID",
    ".venv/bin/lorafleet cancel JOB_ID",
)


def _start_trainer(checkout: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    """``lorafleet trainer-server`` as printed but on free ports, running nothing (--max-running 0)."""
    line = TRAINER_LINES[0].replace("50051", "0").replace("9101", "0")
    argv = [*argv_of(line), "--state-dir", str(checkout / "state"), "--max-running", "0"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "services.cli", *argv],
            cwd=checkout,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"^listening on ([\d.]+:\d+)$", log.read_text(), re.M)
        if found:
            return proc, found.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(log.read_text())


@pytest.mark.integration
@checks(*TRAINER_LINES)
def test_trainer_lines_run_as_printed(
    checkout: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server as printed on free ports; submit (the test model in the example's model path;
    nothing runs: the job stays queued), jobs, cancel and watch as printed with ``--addr``. The job's
    training path runs in tests/test_trainer_service.py."""
    assert "usage: lorafleet trainer-server" in help_parses(TRAINER_LINES[0], capsys)
    shutil.copytree(tiny_llama, checkout / ".cache" / "tiny" / "llama")
    proc, address = _start_trainer(checkout, checkout / "trainer.log")
    try:
        submitted = run_lorafleet(TRAINER_LINES[1], checkout, "--no-watch", "--addr", address)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = submitted.stdout.split("submitted job ")[1].split()[0]
        listed = run_lorafleet(TRAINER_LINES[2], checkout, "--addr", address)
        assert listed.returncode == 0 and job_id in listed.stdout and "queued" in listed.stdout
        cancelled = run_lorafleet(TRAINER_LINES[4].replace("JOB_ID", job_id), checkout, "--addr", address)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
        watched = run_lorafleet(TRAINER_LINES[3].replace("JOB_ID", job_id), checkout, "--addr", address)
        assert watched.returncode == 1 and job_id in watched.stdout and "cancelled" in watched.stdout
    finally:
        proc.terminate()
        proc.wait(30)


# -- the inference service -------------------------------------------------------------------------

INFERENCE_SERVER = (
    ".venv/bin/lorafleet inference-server --model tiny=.cache/tiny/llama --adapters-root .cache/adapters "
    "--port 50052 --metrics-port 9102"
)
INFERENCE_CLIENTS = (
    ".venv/bin/lorafleet models",
    '.venv/bin/lorafleet chat --adapter demo-cblue --message "入选标准：年龄≥18周岁。这句话属于哪一类？"',
    ".venv/bin/lorafleet chat --adapter demo-cblue@1",
    '.venv/bin/lorafleet generate "Once upon a time" --temperature 0 --max-new-tokens 32',
    ".venv/bin/lorafleet load demo-cblue@1",
    ".venv/bin/lorafleet unload demo-cblue@1",
)


@checks(INFERENCE_SERVER)
def test_inference_server_line_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """Long-running: its flags parse into the settings the server runs with. The server itself runs
    through this entry point in tests/test_inference_cli.py."""
    from services.inference.server import build_parser, settings_from_args

    assert "usage: lorafleet inference-server" in help_parses(INFERENCE_SERVER, capsys)
    settings = settings_from_args(build_parser().parse_args(argv_of(INFERENCE_SERVER)[1:]))
    assert (settings.port, settings.metrics_port) == (50052, 9102)


@checks(*INFERENCE_CLIENTS)
@pytest.mark.parametrize("line", INFERENCE_CLIENTS)
def test_inference_client_lines_reach_the_connection(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """As printed, pointed at a port where nothing listens: the flags parse and the client gets as far
    as the RPC. Against a real server they run in tests/test_inference_cli.py."""
    from services.inference import client

    argv = [*argv_of(line)[1:], "--target", "127.0.0.1:1", "--timeout", "3"]
    typed, out = io.StringIO("What hurts?\n"), io.StringIO()  # the interactive chat's first message
    status = client.main(argv_of(line)[0], argv, inp=typed, out=out)
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err + out.getvalue() and "usage:" not in err, err
    interactive = "--message" not in line and line.split()[1] == "chat"
    assert status == (0 if interactive else 2)  # the REPL reports the error and reads on until EOF


# -- deploy ----------------------------------------------------------------------------------------

DEPLOY_SUBMIT = (
    'LORAFLEET_TRAINER_TOKEN="$TOKEN" lorafleet submit --addr localhost:50051 --gpus-per-node 8 examples/lora.yaml '
    "model.name_or_path=/models/Qwen2-7B-Instruct data.train_file=/datasets/mine.jsonl output.adapter_name=mine"
)
KUBECTL = (
    "kubectl apply -k k8s/overlays/gpu",
    'kubectl -n lorafleet create secret generic lorafleet-auth --from-literal=token="$(openssl rand -hex 32)"',
    "TOKEN=$(kubectl -n lorafleet get secret lorafleet-auth -o jsonpath='{.data.token}' | base64 -d)",
    "kubectl -n lorafleet port-forward svc/lorafleet-trainer 50051:50051",
)


@checks(DEPLOY_SUBMIT)
def test_deploy_submit_builds_its_spec_and_reaches_the_connection(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cluster here: as printed, but with the port-forward's address pointing nowhere. The config
    with its overrides must validate locally and the client get as far as the RPC."""
    from services.trainer import client

    argv = argv_of(DEPLOY_SUBMIT.replace("localhost:50051", "127.0.0.1:1"))
    monkeypatch.setenv("LORAFLEET_TRAINER_TOKEN", "t0ken")
    monkeypatch.chdir(ROOT)
    status = client.main(argv[0], argv[1:])
    err = capsys.readouterr().err
    assert status == 2 and "UNAVAILABLE" in err and "usage:" not in err, err


@checks(*KUBECTL)
def test_kubectl_lines_name_objects_the_manifests_define() -> None:
    """No cluster here (tests/test_k8s_manifests.py builds and applies the overlays against an API
    emulator): the overlay exists, the secret is the one the pods read, the service and port exist."""
    base = ROOT / "k8s" / "base"
    assert (ROOT / "k8s" / "overlays" / "gpu" / "kustomization.yaml").is_file()
    assert yaml.safe_load((base / "kustomization.yaml").read_text())["namespace"] == "lorafleet"
    docs = [d for d in yaml.safe_load_all((base / "trainer.yaml").read_text()) if d]
    assert '"lorafleet-auth"' in json.dumps(docs)  # the Secret the server reads its token from
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "lorafleet-trainer"]
    assert 50051 in [p["port"] for p in service["spec"]["ports"]]


# -- benchmark -------------------------------------------------------------------------------------

H1024_BUILD = (
    '.venv/bin/python -c "from lorafleet.tiny import build_tiny_model as b; '
    "b('.cache/tiny/llama-h1024', hidden_size=1024, num_layers=8, num_heads=16)\""
)
H1024_BENCH = (
    ".venv/bin/python -m bench.inference_bench --model .cache/tiny/llama-h1024 --adapters 8 --configs lorafleet "
    "lorafleet_base_only --requests 128 --work-dir bench/out/inference-h1024 --results bench/results_h1024.json"
)


def _calls(code: str) -> Iterator[ast.Call]:
    return (n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call))


@checks(H1024_BUILD)
def test_wide_model_build_line_calls_build_tiny_model_with_its_arguments() -> None:
    """Building the 1024-wide model takes minutes: the code compiles and its arguments bind."""
    from lorafleet.tiny import build_tiny_model

    [call] = _calls(shlex.split(H1024_BUILD)[2])
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    inspect.signature(build_tiny_model).bind(*args, **kwargs)


@checks(H1024_BENCH)
def test_wide_model_bench_line_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """A benchmark run takes minutes: its flags parse (``--help`` appended)."""
    from bench.inference_bench import main as bench_main

    with pytest.raises(SystemExit) as exit_:
        bench_main([*shlex.split(H1024_BENCH)[3:], "--help"])
    assert exit_.value.code == 0
    assert "--configs" in capsys.readouterr().out
