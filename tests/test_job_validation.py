"""The trainer's submit-time validation on hostile specs (issue 16 item 4): every problem is a
``ConfigError`` naming the spec field, and what is accepted can be stored and read back as a proto.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.errors import ConfigError
from services.trainer.jobspec import spec_from_request
from services.trainer.launchers.base import Capacity
from services.trainer.store import JobRequest, ResourceRequest
from services.trainer.validation import validate_submission

SERVER = {"output.run_dir": "/srv/runs/j1/run", "output.adapters_root": "/srv/adapters"}


@pytest.fixture
def train_file(tmp_path: Path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "q", "target": "a"}\n{"input": "q2", "target": "b"}\n', encoding="utf-8")
    return str(path)


def _request(train_file: str, **changes: Any) -> JobRequest:
    config: dict[str, Any] = {"model": {"name_or_path": "org/model"}, "data": {"train_file": train_file}}
    for path, value in changes.pop("config", {}).items():
        section, name = path.split(".")
        config.setdefault(section, {})[name] = value
    return JobRequest(config=config, **changes)


def _refusal(request: JobRequest) -> dict[str, Any]:
    with pytest.raises(ConfigError) as info:
        validate_submission(request, Capacity(), SERVER, check_memory=False)
    return {p.field: p for p in info.value.problems}


def test_a_plain_request_is_accepted_and_round_trips(train_file: str) -> None:
    request = _request(
        train_file, overrides={"lora.rank": "4"}, resources=ResourceRequest(cpu="500m", memory="2Gi")
    )
    accepted = validate_submission(request, Capacity(), SERVER, check_memory=False)
    assert accepted.config.lora.rank == 4
    stored = json.loads(json.dumps(request.to_dict(), allow_nan=False))
    assert spec_from_request(JobRequest.from_dict(stored)) == spec_from_request(request)


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("data.train_file", "/tmp/" + "x" * 300 + ".jsonl", "spec.dataset.train_file"),
        ("data.validation_file", "y" * 300, "spec.dataset.validation_file"),
        ("model.name_or_path", "/" + "m" * 300, "spec.model.name_or_path"),
        ("model.name_or_path", "m" * 300, "spec.model.name_or_path"),
        ("train.resume", "/" + "r" * 300, "spec.overrides['train.resume']"),
    ],
)
def test_names_the_os_refuses_are_field_errors(train_file: str, path: str, value: str, field: str) -> None:
    assert field in _refusal(_request(train_file, config={path: value}))


@pytest.mark.parametrize("resume", ["{tmp}", "{tmp}/missing", "/etc"])
def test_a_job_cannot_resume_from_a_path_and_learns_nothing_about_it(
    train_file: str, tmp_path: Path, resume: str
) -> None:
    value = resume.format(tmp=tmp_path)
    for request in (
        _request(train_file, overrides={"train.resume": value}),
        _request(train_file, config={"train.resume": value}),
    ):
        problem = _refusal(request)["spec.overrides['train.resume']"]
        assert problem.message == "a job may only say auto or never"
    assert (
        validate_submission(
            _request(train_file, overrides={"train.resume": "never"}), Capacity(), SERVER, check_memory=False
        ).config.train.resume
        == "never"
    )


@pytest.mark.parametrize(
    "resources,field",
    [
        (ResourceRequest(cpu="x" * 10_000), "spec.resources.cpu"),
        (ResourceRequest(cpu="lots"), "spec.resources.cpu"),
        (ResourceRequest(cpu="-1"), "spec.resources.cpu"),
        (ResourceRequest(memory="64Gi; rm -rf /"), "spec.resources.memory"),
        (ResourceRequest(memory="1e999"), "spec.resources.memory"),
        (ResourceRequest(memory="\x00"), "spec.resources.memory"),
    ],
)
def test_resource_quantities_are_checked(train_file: str, resources: ResourceRequest, field: str) -> None:
    problems = _refusal(_request(train_file, resources=resources))
    assert field in problems
    assert len(str(problems[field])) < 300


def test_too_many_overrides_are_refused_before_any_is_parsed(train_file: str) -> None:
    overrides = {f"lora.x{i}": "&a [*a]" for i in range(10_000)}
    problems = _refusal(_request(train_file, overrides=overrides))
    assert list(problems) == ["spec.overrides"]


def test_every_problem_is_listed_at_once(train_file: str) -> None:
    request = _request(
        train_file,
        config={"train.epochs": 1e9, "lora.alpha": float("inf")},
        overrides={" output.version": "7", "train.seed": "-1"},
        resources=ResourceRequest(cpu="lots"),
    )
    fields = set(_refusal(request))
    assert {
        "spec.hyperparameters.epochs",
        "spec.lora.alpha",
        "spec.overrides[' output.version']",
        "spec.hyperparameters.seed",
        "spec.resources.cpu",
    } <= fields


def test_a_request_that_cannot_be_stored_is_refused(train_file: str) -> None:
    # Only a caller below the gRPC layer can build such text (protobuf strings are valid UTF-8).
    problems = _refusal(_request(train_file, labels={"owner": "bad\ud800"}))
    assert "cannot be stored" in problems["spec"].message
