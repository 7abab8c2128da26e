"""The container images (services/*/Dockerfile), without a Docker engine.

No Docker engine runs here (shared/STACK.md), so nothing is built: ``dockerfile-parse`` (the parser of
the OpenShift build system) reads every Dockerfile, and the checks go over what it parsed: every path
a ``COPY`` takes from the build context exists in the repository, is not git-ignored and is not
excluded by .dockerignore (matched with Docker's own rules: last match wins, a pattern that matches a
parent directory matches its files); links inside copied trees resolve inside the image; the final
stages run as a numeric non-root user, on pinned base images without build tools; their entrypoints
are the CLI commands the manifests run and parse with the services' real argument parsers; each
``HEALTHCHECK`` command is run here against a real gRPC health server or HTTP server; and
``make -n images`` builds every final stage under the names k8s/base/kustomization.yaml deploys.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from services import cli
from services.common import grpc_util
from services.inference import server as inference_server
from services.trainer import server as trainer_server

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(REPO.glob("services/*/Dockerfile"))
UID = 1000
"""The uid/gid of every final stage; the manifests' ``runAsUser`` (tests/test_k8s_manifests.py)."""


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    """(INSTRUCTION, value) in order, comments left out."""
    parent: str | None = None
    """The earlier stage this one is built FROM (its instructions are included above), or None."""

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def parse(text: str) -> list[Stage]:
    """The stages, with ``${ARG}`` in FROM resolved to the global ARG's default (``BASE_IMAGE``) and a
    stage built FROM an earlier one flattened: its ``base`` is the root image and its instructions
    start with its parents' (what the final image holds)."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", value, re.IGNORECASE)
            assert m, f"cannot read FROM {value!r}"
            base = re.sub(r"\$\{(\w+)\}", lambda a: global_args[a.group(1)], m.group(1))
            name = m.group(2) or str(len(stages))
            parent = next((s for s in stages if s.name == base), None)
            if parent is None:
                stages.append(Stage(name=name, base=base))
            else:
                stages.append(
                    Stage(
                        name=name,
                        base=parent.base,
                        instructions=list(parent.instructions),
                        parent=parent.name,
                    )
                )
        elif instruction == "ARG" and not stages:
            key, _, default = value.partition("=")
            global_args[key.strip()] = default.strip()
        elif instruction != "COMMENT":
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, value))
    return stages


def stage_texts(text: str) -> dict[str, str]:
    """The source text of each stage (from its FROM line to the next), by stage name."""
    parts = re.split(r"(?m)^(?=FROM )", text)
    out = {}
    for part in parts[1:]:
        m = re.match(r"FROM \S+ AS (\S+)", part, re.IGNORECASE)
        assert m, part[:80]
        body = re.sub(r"(?m)^# ----.*\n", "", part)  # the next stage's banner comment
        out[m.group(1)] = body.rstrip()
    return out


def stages_of(path: Path) -> list[Stage]:
    return parse(path.read_text(encoding="utf-8"))


def exec_form(value: str) -> list[str]:
    """ENTRYPOINT/CMD/HEALTHCHECK CMD in exec (JSON) form; the shell form is refused (no signals)."""
    assert value.startswith("["), f"shell form {value!r}: PID 1 would be a shell that drops SIGTERM"
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None


def copies(stage: Stage) -> list[Copy]:
    out = []
    for instruction, value in stage.instructions:
        if instruction not in ("COPY", "ADD"):
            continue
        assert instruction == "COPY", f"ADD {value!r}: use COPY (ADD fetches URLs and unpacks archives)"
        words = shlex.split(value)
        flags = {w.split("=", 1)[0]: w.split("=", 1)[-1] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, value
        out.append(Copy(paths[:-1], paths[-1], flags.get("--from")))
    return out


# -- Docker's .dockerignore rules (github.com/moby/patternmatcher) -----------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" = zero or more directories
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exclusion, pattern) per line, cleaned as Docker cleans them."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = not line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exclusion, _pattern_regex(line)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``path`` (relative, /-separated) out of the build context."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exclusion, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = exclusion
    return result


RULES = dockerignore_rules((REPO / ".dockerignore").read_text(encoding="utf-8"))


def git_ignored(path: Path) -> bool:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", str(path.relative_to(REPO))], cwd=REPO, timeout=30
    )
    return proc.returncode == 0


def context_problems(
    dockerfile_text: str, repo: Path, rules: list[tuple[bool, re.Pattern[str]]]
) -> list[str]:
    """What is wrong with the build-context paths a Dockerfile copies (empty = nothing)."""
    stages = parse(dockerfile_text)
    problems: list[str] = []
    for index, stage in enumerate(stages):
        earlier = {s.name for s in stages[:index]}
        for c in copies(stage):
            if c.from_stage is not None:
                if c.from_stage not in earlier and image_problem(c.from_stage):
                    problems.append(
                        f"COPY --from={c.from_stage}: neither an earlier stage nor a pinned image"
                    )
                continue
            for source in c.sources:
                rel = os.path.normpath(source)
                if rel.startswith("..") or os.path.isabs(rel) or any(ch in rel for ch in "*?["):
                    problems.append(f"COPY {source}: not a plain path inside the build context")
                    continue
                local = repo / rel
                if not local.exists():
                    problems.append(f"COPY {source}: no such file in the repository")
                elif local.is_dir():
                    files = [p for p in local.rglob("*") if p.is_file()]
                    kept = [p for p in files if not excluded(str(p.relative_to(repo)), rules)]
                    if excluded(rel, rules) and not kept:
                        problems.append(f"COPY {source}: excluded by .dockerignore")
                    elif not kept:
                        problems.append(f"COPY {source}: nothing of it is left in the build context")
                elif excluded(rel, rules):
                    problems.append(f"COPY {source}: excluded by .dockerignore")
    return problems


def image_problem(image: str) -> str | None:
    """Why a base image is not pinned to an exact version, or None."""
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"{image}: no tag"
    if tag == "latest" or not re.search(r"\d+\.\d+\.\d+", tag):
        return f"{image}: tag {tag!r} is not an exact version"
    return None


# -- the images `make images` builds -------------------------------------------------------------------


def make_images(registry: str = "", tag: str = "0.1.0") -> list[dict[str, str]]:
    """The ``docker build`` lines of ``make -n images`` (printed, not run), parsed."""
    proc = subprocess.run(
        ["make", "-n", "images", f"REGISTRY={registry}", f"IMAGE_TAG={tag}", "DOCKER=docker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    builds = []
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if words[:2] != ["docker", "build"]:
            continue
        assert words[-1] == ".", f"not built from the repository root: {line}"
        opts = dict(zip(words[2:-1:2], words[3:-1:2], strict=True))
        builds.append({"file": opts["-f"], "target": opts.get("--target", ""), "tag": opts["-t"]})
    return builds


def final_stages() -> Iterator[tuple[str, Path, Stage]]:
    """(image name without registry and tag, Dockerfile, stage) of every image ``make images`` builds."""
    for build in make_images():
        path = REPO / build["file"]
        stages = stages_of(path)
        stage = next(s for s in stages if s.name == build["target"]) if build["target"] else stages[-1]
        yield build["tag"].rsplit(":", 1)[0], path, stage


FINAL = {name: (path, stage) for name, path, stage in final_stages()}


def kustomize_images() -> dict[str, str]:
    doc = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    return {i["name"]: i["newTag"] for i in doc["images"]}


def base_deployments() -> dict[str, dict[str, Any]]:
    """The container of each Deployment in k8s/base, by image name (read as YAML, no kustomize)."""
    out = {}
    for path in (REPO / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                [container] = doc["spec"]["template"]["spec"]["containers"]
                out[container["image"].rsplit(":", 1)[0]] = container
    return out


# -- 5. the Dockerfiles parse and every path they copy exists --------------------------------------


def test_every_service_has_a_multistage_dockerfile() -> None:
    assert {p.parent.name for p in DOCKERFILES} == {"trainer", "inference", "dashboard"}
    for path in DOCKERFILES:
        text = path.read_text(encoding="utf-8")
        assert text.startswith("# syntax=docker/dockerfile:1"), path
        stages = stages_of(path)
        assert len(stages) >= 2, f"{path}: not multi-stage"
        assert len({s.name for s in stages}) == len(stages), path
        for stage in stages:
            assert image_problem(stage.base) is None, (path, image_problem(stage.base))
        assert re.search(r"(?m)^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", text), path


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_copied_path_is_in_the_build_context(path: Path) -> None:
    assert context_problems(path.read_text(encoding="utf-8"), REPO, RULES) == []
    for stage in stages_of(path):
        for c in copies(stage):
            if c.from_stage is None:
                for source in c.sources:
                    assert not git_ignored(REPO / source), f"{source} is git-ignored: not in a fresh clone"


def test_context_check_can_fail(tmp_path: Path) -> None:
    """Missing, excluded and ignored-by-directory sources are each reported."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("", encoding="utf-8")
    (tmp_path / "app" / "__pycache__").mkdir()
    (tmp_path / "app" / "__pycache__" / "main.pyc").write_text("", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("", encoding="utf-8")
    rules = dockerignore_rules("**\n!app/\n**/__pycache__\n")
    dockerfile = (
        "FROM python:3.11.13-slim AS build\n"
        "COPY app ./app\n"
        "COPY missing.txt notes.txt ./\n"
        "COPY app/__pycache__ ./cache\n"
        "FROM python:3.11.13-slim\n"
        "COPY --from=build /app /app\n"
        "COPY --from=nowhere /x /x\n"
        "COPY ../secret /x\n"
    )
    problems = context_problems(dockerfile, tmp_path, rules)
    assert problems == [
        "COPY missing.txt: no such file in the repository",
        "COPY notes.txt: excluded by .dockerignore",
        "COPY app/__pycache__: excluded by .dockerignore",
        "COPY --from=nowhere: neither an earlier stage nor a pinned image",
        "COPY ../secret: not a plain path inside the build context",
    ]


def test_dockerignore_follows_dockers_rules() -> None:
    """Last match wins; a pattern matching a parent directory matches what is under it."""
    cases = {
        "lorafleet/cli.py": False,
        "services/trainer/server.py": False,
        "services/trainer/training-job-template.yaml": False,
        "k8s/base/training-job-template.yaml": False,
        "pyproject.toml": False,
        "k8s/base/trainer.yaml": True,
        "tests/test_dockerfiles.py": True,
        ".venv/bin/python": True,
        ".cache/tiny/llama/config.json": True,
        ".git/HEAD": True,
        "services/trainer/__pycache__/server.cpython-311.pyc": True,
        "lorafleet/stray.pyc": True,
    }
    assert {path: excluded(path, RULES) for path in cases} == cases
    assert _pattern_regex("**/x").fullmatch("x") and _pattern_regex("**/x").fullmatch("a/b/x")
    assert not _pattern_regex("a/*").fullmatch("a/b/c")


@pytest.mark.parametrize("name", sorted(FINAL))
def test_links_in_copied_trees_resolve_inside_the_image(name: str) -> None:
    """A symlink the image gets (services/trainer/training-job-template.yaml) must not dangle there."""
    _, stage = FINAL[name]
    workdir = PurePosixPath(stage.values("WORKDIR")[-1])
    in_image: dict[PurePosixPath, Path] = {}  # where each copied repository path lands
    for c in copies(stage):
        if c.from_stage is None:
            for source in c.sources:
                dest = PurePosixPath(c.dest)
                dest = dest if dest.is_absolute() else workdir / dest
                if c.dest.endswith("/"):
                    dest = dest / PurePosixPath(source).name
                in_image[dest] = REPO / source
    assert in_image, f"{name}: copies nothing from the repository"
    for dest, local in in_image.items():
        # The layout is the repository's below the working directory: relative links keep working.
        assert dest == workdir / local.relative_to(REPO), (name, dest)
    links = [p for s in in_image.values() if s.is_dir() for p in s.rglob("*") if p.is_symlink()]
    links += [s for s in in_image.values() if s.is_symlink()]
    for link in links:
        if excluded(str(link.relative_to(REPO)), RULES):
            continue
        target = link.resolve()
        assert any(target == s or s in target.parents for s in in_image.values()), (
            f"{name}: {link.relative_to(REPO)} -> {target} is not copied into the image"
        )


# -- the final stages: non-root, no build tools, the CLI as entrypoint, health checks ------------------


def test_make_images_builds_every_final_stage_under_the_deployed_names() -> None:
    builds = make_images(registry="registry.example.com/lorafleet/", tag="9.9.9")
    tags = kustomize_images()
    assert sorted(b["tag"] for b in builds) == sorted(
        f"registry.example.com/lorafleet/{n}:9.9.9" for n in tags
    )
    assert {b["file"] for b in builds} == {str(p.relative_to(REPO)) for p in DOCKERFILES}
    for build in builds:
        names = [s.name for s in stages_of(REPO / build["file"])]
        assert not build["target"] or build["target"] in names, build
    assert set(tags.values()) == {"0.1.0"}  # the Makefile's default IMAGE_TAG
    assert {b["tag"] for b in make_images()} == {f"{n}:0.1.0" for n in tags}


@pytest.mark.parametrize("name", sorted(FINAL))
def test_final_stage_runs_as_numeric_non_root_user(name: str) -> None:
    _, stage = FINAL[name]
    users = stage.values("USER")
    assert users == [f"{UID}:{UID}"], f"{name}: USER {users}"
    # Nothing runs as root after the switch, and the user is the last word on it.
    after = [i for i, _ in stage.instructions[[i for i, _ in stage.instructions].index("USER") :]]
    assert "RUN" not in after, name
    assert any(f"--uid {UID}" in v and f"--gid {UID}" in v for v in stage.values("RUN")), name


@pytest.mark.parametrize("name", sorted(FINAL))
def test_final_stage_has_no_build_tools(name: str) -> None:
    _, stage = FINAL[name]
    assert "devel" not in stage.base, f"{name}: {stage.base} carries compilers"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", stage.base), (name, stage.base)
    for run in stage.values("RUN"):
        assert not re.search(r"\b(apt-get|apt|pip|uv)\s+install\b|\bgcc\b|build-essential", run), (name, run)
    for c in copies(stage):
        assert c.from_stage is None or not c.from_stage.startswith("ghcr.io/astral-sh/uv"), name


def entrypoint(stage: Stage) -> list[str]:
    [ep] = stage.values("ENTRYPOINT")
    [cmd] = stage.values("CMD")
    return exec_form(ep) + exec_form(cmd)


@pytest.mark.parametrize(
    ("name", "command", "parser"),
    [
        ("lorafleet-trainer", "trainer-server", trainer_server.build_parser),
        ("lorafleet-inference", "inference-server", inference_server.build_parser),
    ],
)
def test_server_images_run_the_cli(name: str, command: str, parser: Any) -> None:
    """ENTRYPOINT + CMD is `python -m services.cli <server>`, its flags parse, and the Deployment
    in k8s/base runs the same command with the same ports."""
    _, stage = FINAL[name]
    argv = entrypoint(stage)
    assert argv[:4] == ["python", "-m", "services.cli", command]
    assert command in cli.COMMANDS  # the CLI hands everything after it to the server's parser
    args = parser().parse_args(argv[4:])
    assert args.host == "0.0.0.0"
    container = base_deployments()[name]
    assert container["command"] == ["python", "-m", "services.cli", command]
    exposed = {int(p) for v in stage.values("EXPOSE") for p in v.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}


def test_worker_image_runs_the_cli_and_the_template_sets_the_command() -> None:
    _, stage = FINAL["lorafleet-trainer-worker"]
    assert entrypoint(stage)[:3] == ["python", "-m", "services.cli"]
    template = (REPO / "k8s" / "base" / "training-job-template.yaml").read_text(encoding="utf-8")
    assert 'command: "${command}"' in template  # the launcher's torchrun/deepspeed line, not the image's


def test_dashboard_image_runs_the_app_with_streamlit() -> None:
    _, stage = FINAL["lorafleet-dashboard"]
    argv = entrypoint(stage)
    assert argv == ["streamlit", "run", "services/dashboard/app.py"]
    workdir = PurePosixPath(stage.values("WORKDIR")[-1])
    assert (REPO / argv[2]).is_file() and workdir == PurePosixPath("/app")
    assert any("services" in c.sources for c in copies(stage))
    env = " ".join(stage.values("ENV"))
    assert "STREAMLIT_SERVER_PORT=8501" in env and "STREAMLIT_SERVER_ADDRESS=0.0.0.0" in env
    container = base_deployments()["lorafleet-dashboard"]
    assert container["command"][:3] == argv and "--server.port=8501" in container["command"]
    exposed = {int(p) for v in stage.values("EXPOSE") for p in v.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]} == {8501, 9103}


# -- the HEALTHCHECK commands, run here against real servers ------------------------------------------


def healthcheck(name: str) -> list[str]:
    _, stage = FINAL[name]
    [value] = stage.values("HEALTHCHECK")
    m = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.*)", value, re.DOTALL)
    assert m, value
    options = dict(o.split("=", 1) for o in m.group(1).split())
    assert set(options) == {"--interval", "--timeout", "--start-period", "--retries"}
    argv = exec_form(m.group(2))
    assert argv[:2] == ["python", "-c"]
    return [sys.executable, *argv[1:]]


def run_check(argv: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("name", "port_env", "service"),
    [
        ("lorafleet-trainer", "LORAFLEET_TRAINER_PORT", "lorafleet.v1.TrainerService"),
        ("lorafleet-inference", "LORAFLEET_INFERENCE_PORT", "lorafleet.v1.InferenceService"),
    ],
)
def test_grpc_healthcheck_follows_the_health_service(name: str, port_env: str, service: str) -> None:
    from concurrent import futures

    argv = healthcheck(name)
    assert port_env in argv[-1]
    port = free_port()
    assert run_check(argv, {port_env: str(port)}) != 0  # nothing listening
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health = grpc_util.add_health_and_reflection(server, [service])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        assert run_check(argv, {port_env: str(port)}) == 1  # NOT_SERVING: still loading
        grpc_util.set_serving(health, [service], True)
        assert run_check(argv, {port_env: str(port)}) == 0
    finally:
        server.stop(None)


def test_dashboard_healthcheck_asks_streamlits_health_endpoint() -> None:
    argv = healthcheck("lorafleet-dashboard")
    paths: list[str] = []
    status = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the http.server API
            paths.append(self.path)
            self.send_response(status["code"] if self.path == "/_stcore/health" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"STREAMLIT_SERVER_PORT": str(httpd.server_address[1])}
        assert run_check(argv, env) != 0
        status["code"] = 200
        assert run_check(argv, env) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert paths == ["/_stcore/health"] * 2


def test_build_stages_install_what_pyproject_needs() -> None:
    """The stage that installs the dependencies has the files it reads, and torch pinned first."""
    for path in DOCKERFILES:
        [deps] = [s for s in stages_of(path) if any("pip install" in r for r in s.values("RUN"))]
        copied = {s for c in copies(deps) if c.from_stage is None for s in c.sources}
        assert copied == {"pyproject.toml", "constraints.txt"}, (
            path,
            copied,
        )  # no code: cache survives edits
        runs = " ".join(deps.values("RUN"))
        assert re.search(r"torch==2\.13\.0", runs) and "-c constraints.txt" in runs, path
        assert "['project']['dependencies']" in runs, path


def test_deps_and_runtime_stages_are_the_same_in_every_dockerfile() -> None:
    """So that a layer cache builds them once for every image (scripts/build_images.sh)."""
    texts = {path: stage_texts(path.read_text(encoding="utf-8")) for path in DOCKERFILES}
    for stage in ("deps", "runtime"):
        variants = {t[stage] for t in texts.values()}
        assert len(variants) == 1, f"the {stage} stage differs between {sorted(map(str, texts))}"
    for path in DOCKERFILES:
        finals = [s for s in stages_of(path) if s.name not in ("deps", "runtime")]
        assert finals and all(s.parent == "runtime" for s in finals), path


def test_nothing_is_downloaded_but_debian_and_python_packages() -> None:
    """No base but BASE_IMAGE, no uv or CPython download, no curl/wget/ADD; torch from an index arg."""
    for path in DOCKERFILES:
        text = path.read_text(encoding="utf-8")
        froms = re.findall(r"(?m)^FROM (\S+)", text)
        assert set(froms) <= {"${BASE_IMAGE}", "runtime"}, (path, froms)
        assert not re.search(r"\b(uv|curl|wget)\b|^ADD ", text, re.MULTILINE), path
        assert "ARG TORCH_VARIANT=cpu" in text
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}" in text


def test_build_script_builds_what_make_images_builds() -> None:
    """scripts/build_images.sh (BUILDER=buildah) and the docker lines build the same images."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_images.sh"), "--list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    listed = {tuple(line.split()) for line in proc.stdout.splitlines()}
    expected = {(b["tag"].rsplit(":", 1)[0], b["file"], b["target"]) for b in make_images()}
    assert listed == expected
    dry = subprocess.run(
        ["make", "-n", "images", "BUILDER=buildah"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0 and "scripts/build_images.sh" in dry.stdout, dry.stdout + dry.stderr
