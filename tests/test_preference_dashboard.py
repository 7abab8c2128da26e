"""The dashboard and the preference stages (issue 19 item 4): the submit form offers the stages and
only the chosen stage's options (read from the method table and the config), and a preference
job's page charts its rewards, margin, accuracy and log-probs while it trains.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from dashboard_utils import APP, dead_address, errors, no_exception, table, wait_until
from streamlit.testing.v1 import AppTest
from trainer_utils import TrainerProcess, processes_with_env

from lorafleet.config import PreferenceConfig
from lorafleet.datagen import generate_preference_datasets
from lorafleet.method_specs import METHOD_SPECS, STAGE_OPTIONS, STAGES
from lorafleet.v1 import trainer_pb2 as pb
from services.dashboard import forms

PREFERENCE_CHARTS = ("chart-rewards", "chart-preference-accuracy", "chart-logps")


def _shown(at: AppTest) -> set[str]:
    """Form paths whose field container is on the page."""
    out = set()
    for path in forms.FIELDS:
        try:
            at.get_by_key("field-" + path.replace(".", "-"))
        except KeyError:
            continue
        out.add(path)
    return out


def _open(monkeypatch: pytest.MonkeyPatch, trainer_addr: str, page: str | None = None) -> AppTest:
    monkeypatch.setenv("LORAFLEET_TRAINER_ADDR", trainer_addr)
    monkeypatch.setenv("LORAFLEET_INFERENCE_ADDR", dead_address())
    monkeypatch.setenv("LORAFLEET_DASHBOARD_METRICS_PORT", "-1")
    monkeypatch.setenv("LORAFLEET_DASHBOARD_REFRESH_S", "1")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    if page:
        at.switch_page(page).run()
    return at


# -- the form as data ---------------------------------------------------------------------------------


def test_every_preference_option_has_a_field_shown_for_the_stages_that_read_it() -> None:
    for f in dataclasses.fields(PreferenceConfig):
        field = forms.FIELDS[f"preference.{f.name}"]
        assert set(field.stages) == {s for s, names in STAGE_OPTIONS.items() if f.name in names}, f.name
    assert forms.STAGE_FIELD.options == STAGES
    for stage in STAGES:
        assert forms.methods_for_stage(stage) == tuple(
            n for n, s in METHOD_SPECS.items() if stage in s.stages
        )


def test_the_spec_carries_only_the_chosen_stages_options() -> None:
    values = {
        "method": "lora",
        "preference.loss": "simpo",
        "preference.beta": 2.0,
        "preference.gamma": 0.4,
        "preference.desirable_weight": 3.0,
        "preference.sft_adapter": "sft@1",
        "preference.precompute_reference": forms.DEFAULT,
    }
    dpo = forms.build_spec({**values, forms.STAGE_PATH: "dpo"})
    assert dpo.stage == "dpo" and dpo.preference.loss == "simpo" and dpo.preference.gamma == 0.4
    assert not dpo.preference.HasField("desirable_weight") and not dpo.preference.HasField(
        "precompute_reference"
    )
    kto = forms.build_spec({**values, forms.STAGE_PATH: "kto"})
    assert kto.preference.desirable_weight == 3.0 and kto.preference.sft_adapter == "sft@1"
    assert not kto.preference.HasField("loss") and not kto.preference.HasField("gamma")
    sft = forms.build_spec({**values, forms.STAGE_PATH: "sft"})
    assert sft.stage == "" and not sft.HasField("preference")


# -- the form on the page (no trainer needed to draw it) -------------------------------------------------


def test_choosing_a_stage_shows_its_options_and_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(monkeypatch, dead_address())
    no_exception(at)
    assert at.selectbox(key="form.stage").value == "sft"
    assert not any(p.startswith("preference.") for p in _shown(at))
    assert tuple(at.selectbox(key="form.method").options) == forms.methods_for_stage("sft")

    at.selectbox(key="form.stage").set_value("dpo").run()
    no_exception(at)
    shown = {p.removeprefix("preference.") for p in _shown(at) if p.startswith("preference.")}
    assert shown == set(STAGE_OPTIONS["dpo"])
    assert "ipo" in at.selectbox(key="form.preference.loss").options
    assert tuple(at.selectbox(key="form.method").options) == forms.methods_for_stage("dpo")

    at.selectbox(key="form.stage").set_value("rm").run()
    no_exception(at)
    shown = {p.removeprefix("preference.") for p in _shown(at) if p.startswith("preference.")}
    assert shown == set(STAGE_OPTIONS["rm"])
    # Only the methods that train a reward model, and full is not one of them.
    assert tuple(at.selectbox(key="form.method").options) == forms.methods_for_stage("rm")
    assert at.selectbox(key="form.method").value == "lora"


# -- a real trainer: a DPO job submitted from the form, charted live ------------------------------------


@pytest.fixture
def trainer(tmp_path: Path):
    t = TrainerProcess(tmp_path / "state", tmp_path / "adapters").start()
    yield t
    t.stop()
    for p in processes_with_env("LORAFLEET_TEST_MARK", str(tmp_path)):
        p.kill()


def _charts(at: AppTest) -> dict[str, int]:
    """Points drawn per preference chart (container key -> rows of its data)."""
    from streamlit import dataframe_util

    out = {}
    for key in PREFERENCE_CHARTS:
        try:
            block = at.get_by_key(key)
        except KeyError:
            continue
        for node in block.get("vega_lite_chart"):
            proto = node.proto
            blobs = [d.data.data for d in proto.datasets]
            if proto.HasField("data") and proto.data.data:
                blobs.append(proto.data.data)
            out[key] = sum(len(dataframe_util.convert_arrow_bytes_to_pandas_df(b)) for b in blobs)
    return out


@pytest.mark.integration
def test_a_dpo_job_from_the_form_shows_its_preference_charts(
    trainer: TrainerProcess, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pref = generate_preference_datasets(str(tmp_path / "pref"))
    at = _open(monkeypatch, trainer.address)
    at.selectbox(key="form.stage").set_value("dpo").run()
    values = {
        "model.name_or_path": str(tiny_llama),
        "dataset.train_file": str(pref["preference_train"]),
        "dataset.validation_file": str(pref["preference_validation"]),
        "dataset.max_source_length": 64,
        "dataset.max_target_length": 16,
        "preference.loss": "sigmoid",
        "preference.beta": 0.1,
        "hyperparameters.max_steps": 60,
        "hyperparameters.logging_steps": 2,
        "hyperparameters.learning_rate": 5e-3,
        "hyperparameters.num_threads": 1,
        "adapter_name": "dash-dpo",
    }
    for path, value in values.items():
        at.get_by_key("form." + path).set_value(value)
    at.button(key="form.submit").click().run()
    no_exception(at)
    submitted = [str(s.value) for s in at.success if "submitted as job" in str(s.value)]
    assert submitted, errors(at)
    job_id = re.search(r"job \*\*(\w+)\*\*", submitted[0]).group(1)
    job = trainer.stub.GetJob(pb.GetJobRequest(job_id=job_id))
    assert job.spec.stage == "dpo" and job.spec.preference.beta == 0.1

    jobs = table(at, "jobs-table")
    assert jobs[jobs["job"] == job_id].iloc[0]["stage"] == "dpo"
    at.selectbox(key="jobs.selected").set_value(job_id)
    at.button(key="jobs.open").click().run()
    no_exception(at)

    seen_running: list[dict[str, int]] = []

    def poll() -> tuple[dict[str, int], str]:
        at.run()
        no_exception(at)
        state = next(str(m.value) for m in at.metric if m.label == "State")
        drawn = _charts(at)
        if state == "running" and drawn:
            seen_running.append(drawn)
        return drawn, state

    wait_until(lambda: poll()[1] == "succeeded", 300, 0.5, "the DPO job to finish")
    drawn, _ = poll()
    assert seen_running, "no preference chart was drawn while the job ran"
    assert set(drawn) == set(PREFERENCE_CHARTS)
    # 30 records: rewards has chosen, rejected and margin; accuracy one line; log-probs two.
    assert drawn == {"chart-rewards": 90, "chart-preference-accuracy": 30, "chart-logps": 60}, drawn
    headline = {m.label: str(m.value) for m in at.metric}
    assert "preference_accuracy" in headline and "mean_margin" in headline, headline
    assert not headline["mean_margin"].endswith("%")
