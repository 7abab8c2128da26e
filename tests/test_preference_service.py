"""Preference stages through the trainer service (issue 19 item 4): the JobSpec carries the stage and
its options both ways, bad ones are field errors, and a real server trains SFT, then DPO from the
adapter it just published, streaming the preference metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from trainer_utils import TrainerProcess, lora_spec, processes_with_env, watch_all

from lorafleet.config import config_from_dict
from lorafleet.datagen import generate_preference_datasets
from lorafleet.errors import ConfigError
from lorafleet.method_specs import STAGE_OPTIONS
from lorafleet.v1 import trainer_pb2 as pb
from services.common.field_errors import field_violations
from services.trainer.jobspec import config_to_spec, request_from_spec, request_to_config
from services.trainer.launchers.base import Capacity
from services.trainer.store import JobRequest
from services.trainer.validation import validate_submission

SERVER = {"output.run_dir": "/srv/runs/j1/run", "output.adapters_root": "/srv/adapters"}
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_preference_datasets(str(tmp_path_factory.mktemp("pref")))


def _tree(pref_data: dict[str, Path], stage: str = "dpo", **preference: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "org/model"},
        "data": {"train_file": str(pref_data["kto_train" if stage == "kto" else "preference_train"])},
        "stage": stage,
        "preference": preference,
    }


def _refusal(request: JobRequest, server: dict[str, Any] = SERVER) -> dict[str, Any]:
    with pytest.raises(ConfigError) as info:
        validate_submission(request, Capacity(), server, check_memory=False)
    return {p.field: p for p in info.value.problems}


# -- the mapping --------------------------------------------------------------------------------------


def test_proto_options_mirror_the_config_section() -> None:
    from lorafleet.config import PreferenceConfig

    fields = {f.name for f in pb.PreferenceOptions.DESCRIPTOR.fields}
    assert fields == set(PreferenceConfig.__dataclass_fields__)
    assert {n for names in STAGE_OPTIONS.values() for n in names} <= fields


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_a_stage_round_trips_through_the_spec(pref_data: dict[str, Path], stage: str) -> None:
    preference = {"dpo": {"loss": "simpo", "beta": 2.0, "gamma": 0.3}, "kto": {"beta": 0.2}, "rm": {}}[stage]
    config = config_from_dict({**_tree(pref_data, stage, **preference), "output": {"run_dir": "x"}})
    spec = config_to_spec(config)
    assert spec.stage == stage
    # Only the options the stage reads travel: the server refuses the others.
    assert {f.name for f, _ in spec.preference.ListFields()} == set(STAGE_OPTIONS[stage])
    back = request_to_config(request_from_spec(spec), SERVER)
    assert back.stage == stage and back.preference == config.preference


def test_an_sft_config_sends_no_preference_options(pref_data: dict[str, Path]) -> None:
    spec = config_to_spec(config_from_dict({"model": {"name_or_path": "org/m"}, "data": {"train_file": "x"}}))
    assert spec.stage == "sft" and not spec.HasField("preference")


# -- field errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tree,field,texts",
    [
        ({"stage": "ppo"}, "spec.stage", ["'ppo'", "sft", "dpo"]),
        ({"preference": {"beta": 0.0}}, "spec.preference.beta", ["must be > 0"]),
        ({"preference": {"beta": -1.0}}, "spec.preference.beta", ["-1.0"]),
        ({"preference": {"loss": "hinge"}}, "spec.preference.loss", ["'hinge'", "sigmoid"]),
        ({"preference": {"label_smoothing": 0.5}}, "spec.preference.label_smoothing", ["[0, 0.5)"]),
        ({"stage": "kto", "preference": {"loss": "ipo"}}, "spec.preference.loss", ["stage kto", "['dpo']"]),
        ({"stage": "rm", "preference": {"beta": 0.2}}, "spec.preference.beta", ["stage rm does not use"]),
        ({"stage": "sft", "preference": {"gamma": 1.0}}, "spec.preference.gamma", ["stage sft"]),
        ({"preference": {"sft_adapter": "no-version"}}, "spec.preference.sft_adapter", ["name@version"]),
        ({"preference": {"sft_adapter": "../x@1"}}, "spec.preference.sft_adapter", ["name@version"]),
        (
            {"preference": {"sft_adapter": "ghost@1"}},
            "spec.preference.sft_adapter",
            ["not published", "ghost@1"],
        ),
        ({"method": "ptuning"}, "spec.stage", ["method ptuning trains the stages ['sft']"]),
        ({"stage": "rm", "method": "full"}, "spec.stage", ["method full", "'rm'"]),
        ({"preference": {"desirable_weight": 2.0}}, "spec.preference.desirable_weight", ["['kto']"]),
    ],
)
def test_bad_preference_specs_name_the_field(
    pref_data: dict[str, Path], tmp_path: Path, tree: dict[str, Any], field: str, texts: list[str]
) -> None:
    config = _tree(pref_data, tree.get("stage", "dpo"))
    config["preference"] = tree.get("preference", {})
    if "method" in tree:
        config["method"] = tree["method"]
    problems = _refusal(JobRequest(config=config), {**SERVER, "output.adapters_root": str(tmp_path)})
    assert field in problems, problems
    message = f"{problems[field].value!r} {problems[field].message}"
    for text in texts:
        assert text in message, message


def test_an_override_the_stage_does_not_read_is_refused(pref_data: dict[str, Path]) -> None:
    request = JobRequest(config=_tree(pref_data, "rm"), overrides={"preference.loss": "ipo"})
    problems = _refusal(request)
    assert "stage rm does not use it" in problems["spec.overrides['preference.loss']"].message


def test_bad_preference_rows_are_listed_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "a"}\n'
        '{"prompt": "q", "chosen": "same", "rejected": "same"}\n',
        encoding="utf-8",
    )
    config = {"model": {"name_or_path": "org/model"}, "data": {"train_file": str(path)}, "stage": "dpo"}
    problem = _refusal(JobRequest(config=config))["spec.dataset.train_file"]
    assert f"{path}:2: rejected" in problem.message and f"{path}:3: rejected" in problem.message
    # The same file as SFT data would be checked with the SFT parser instead: a pairwise file passes here.
    kto = dict(config, stage="kto")
    assert "completion" in _refusal(JobRequest(config=kto))["spec.dataset.train_file"].message


# -- a real server: SFT, then DPO from it --------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path: Path):
    t = TrainerProcess(tmp_path / "state", tmp_path / "adapters", ["--metrics-port", "0"]).start()
    yield t
    t.stop()
    for p in processes_with_env("LORAFLEET_TEST_MARK", str(tmp_path)):
        p.kill()


def _dpo_spec(model: Path, pref_data: dict[str, Path], sft_ref: str) -> pb.JobSpec:
    return pb.JobSpec(
        model=pb.ModelSpec(name_or_path=str(model)),
        dataset=pb.DatasetSpec(
            train_file=str(pref_data["preference_train"]),
            validation_file=str(pref_data["preference_validation"]),
            max_source_length=64,
            max_target_length=16,
        ),
        method="lora",
        stage="dpo",
        preference=pb.PreferenceOptions(loss="sigmoid", beta=0.1, sft_adapter=sft_ref),
        lora=pb.LoraOptions(rank=8, alpha=16, dropout=0.0),
        hyperparameters=pb.Hyperparameters(
            max_steps=24,
            per_device_batch_size=8,
            learning_rate=5e-3,
            lr_scheduler="constant",
            logging_steps=4,
            num_threads=1,
        ),
        adapter_name="svc-dpo",
    )


@pytest.mark.integration
def test_dpo_job_from_a_published_sft_adapter(
    trainer: TrainerProcess, tiny_llama: Path, bundled_data: dict[str, Path], pref_data, tmp_path: Path
) -> None:
    stub = trainer.stub
    sft = stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data, max_steps=8)))
    # Before the SFT adapter exists, a DPO job starting from it is refused, by field.
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(pb.SubmitJobRequest(spec=_dpo_spec(tiny_llama, pref_data, "svc-lora@1")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field: v.description for v in field_violations(info.value)}
    assert "svc-lora@1" in violations["spec.preference.sft_adapter"], violations
    assert trainer.wait_for(sft.id).state == pb.JOB_STATE_SUCCEEDED

    dpo = stub.SubmitJob(pb.SubmitJobRequest(spec=_dpo_spec(tiny_llama, pref_data, "svc-lora@1")))
    assert dpo.spec.stage == "dpo" and dpo.spec.preference.sft_adapter == "svc-lora@1"
    records = [ev.metrics for ev in watch_all(stub, dpo.id) if ev.WhichOneof("event") == "metrics"]
    final = stub.GetJob(pb.GetJobRequest(job_id=dpo.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.reason + final.log_tail
    assert len(records) == 6 and all(r.HasField("loss") for r in records)
    for name in PREFERENCE_METRICS:
        assert all(name in r.values for r in records), (name, dict(records[0].values))
    assert records[-1].values["rewards/margins"] > records[0].values["rewards/margins"]

    # Held-out preference accuracy and mean margin, before and after.
    m = final.final_metrics
    assert 0.0 <= m["initial_preference_accuracy"] <= 1.0 and m["initial_mean_margin"] == pytest.approx(
        0, abs=1e-6
    )
    assert m["preference_accuracy"] > m["initial_preference_accuracy"] and m["mean_margin"] > 0, dict(m)
    assert final.adapter.ref == "svc-dpo@1"
    manifest = json.loads(final.adapter.manifest_json)
    assert manifest["stage"] == "dpo" and manifest["started_from"] == "svc-lora@1"
    on_disk = json.loads((tmp_path / "adapters" / "svc-dpo" / "1" / "lorafleet_manifest.json").read_text())
    assert on_disk["started_from"] == "svc-lora@1"

    # The CLI submits a YAML run config with its stage (here a dry run on the same server).
    path = tmp_path / "kto.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "data": {"train_file": str(pref_data["kto_train"])},
                "stage": "kto",
                "preference": {"sft_adapter": "svc-lora@1"},
                "output": {"adapter_name": "cli-kto"},
            }
        )
    )

    def submit(*overrides: str) -> subprocess.CompletedProcess[str]:
        command = ["submit", str(path), *overrides, "--addr", trainer.address, "--dry-run"]
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *command], capture_output=True, text=True, timeout=120
        )

    ok = submit("preference.beta=0.2")
    assert ok.returncode == 0 and "validated job" in ok.stdout, ok.stdout + ok.stderr
    bad = submit("stage=rm", "method=full")
    assert bad.returncode == 2 and "stage" in bad.stderr, bad.stdout + bad.stderr


# -- Prometheus -------------------------------------------------------------------------------------

DPO_RECORD = {
    "step": 4,
    "loss": 0.61,
    "rewards/chosen": 0.12,
    "rewards/rejected": -0.08,
    "rewards/margins": 0.2,
    "rewards/accuracies": 0.75,
    "logps/chosen": -14.5,
    "logps/rejected": -16.25,
}
PREFERENCE_GAUGES = {
    "rewards_chosen": 0.12,
    "rewards_rejected": -0.08,
    "reward_margin": 0.2,
    "preference_accuracy": 0.75,
    "logps_chosen": -14.5,
    "logps_rejected": -16.25,
    "loss": 0.61,
}


def _samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_trainer_exports_preference_gauges_per_running_job() -> None:
    from prom_utils import promtool_check_metrics

    from services.trainer.metrics import TrainerMetrics

    m = TrainerMetrics()
    m.update_progress("dpo-job", DPO_RECORD)
    m.update_progress("sft-job", {"step": 4, "loss": 2.0})
    got = _samples(m.exposition().decode())
    for short, value in PREFERENCE_GAUGES.items():
        assert got[f"lorafleet_trainer_job_{short}"][(("job_id", "dpo-job"),)] == value, short
    # An SFT job has its loss and no preference series.
    assert got["lorafleet_trainer_job_loss"][(("job_id", "sft-job"),)] == 2.0
    for short in set(PREFERENCE_GAUGES) - {"loss"}:
        assert (("job_id", "sft-job"),) not in got[f"lorafleet_trainer_job_{short}"], short
    code, output = promtool_check_metrics(m.exposition())
    assert code == 0, output
    m.drop_job("dpo-job")
    assert b'job_id="dpo-job"' not in m.exposition()


def test_a_run_endpoint_shows_preference_gauges_only_for_preference_runs() -> None:
    from prom_utils import promtool_check_metrics
    from prometheus_client import generate_latest

    from services.trainer.run_metrics import RunMetrics

    sft = RunMetrics("run-sft", "lora", node_rank=0, main=True)
    sft.observe({"step": 2, "loss": 2.0})
    assert b"reward_margin" not in generate_latest(sft.registry)
    dpo = RunMetrics("run-dpo", "lora", node_rank=0, main=True)
    dpo.observe(DPO_RECORD)
    dpo.observe({"step": 8, "rewards/accuracies": 1.0})  # a partial record keeps the others
    got = _samples(generate_latest(dpo.registry).decode())
    assert got["lorafleet_training_preference_accuracy"] == {(): 1.0}
    assert got["lorafleet_training_reward_margin"] == {(): 0.2}
    assert got["lorafleet_training_logps_rejected"] == {(): -16.25}
    code, output = promtool_check_metrics(generate_latest(dpo.registry))
    assert code == 0, output


@pytest.mark.integration
def test_real_prometheus_scrapes_a_preference_job(tmp_path: Path) -> None:
    from prom_utils import running_prometheus

    from services.trainer.metrics import TrainerMetrics

    with TrainerMetrics() as m:
        server, _ = m.serve(0)
        m.update_progress("dpo-job", DPO_RECORD)
        with running_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path) as prom:
            query = 'lorafleet_trainer_job_preference_accuracy{job_id="dpo-job"}'
            found = prom.wait_for(query, lambda r: len(r) == 1, timeout=30)
            assert float(found[0]["value"][1]) == 0.75
            m.update_progress("dpo-job", {"step": 8, "rewards/margins": 0.9})
            margin = 'lorafleet_trainer_job_reward_margin{job_id="dpo-job"}'
            prom.wait_for(margin, lambda r: len(r) == 1 and float(r[0]["value"][1]) == 0.9, timeout=30)
