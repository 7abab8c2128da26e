"""Importing plain PEFT adapters (``lorafleet.adapter_import``): checks against the base, pickle
conversion without running code, manifest and atomic publish; the inference service's one answer
for a directory without a manifest; and a round trip from plain PEFT training to served tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from lorafleet.adapter_import import (
    ADAPTER_CONFIG,
    PICKLE_WEIGHTS,
    SAFETENSORS_WEIGHTS,
    ImportRequest,
    import_adapter,
    serving_note,
)
from lorafleet.adapters import MANIFEST_NAME, get_adapter, list_adapters, verify_files
from lorafleet.errors import AdapterImportError
from lorafleet.method_specs import LORA_OPTION_SERVABLE
from lorafleet.models import base_model_fingerprint, fingerprints_match
from lorafleet.v1 import inference_pb2 as pb
from tests.inference_service_utils import greedy, serving, settings_for, stub_for
from tests.inference_utils import save_lora_adapter


def test_directory_without_manifest_gets_one_answer_everywhere(tiny_llama: Path, tmp_path: Path) -> None:
    """ListModels and Generate/Chat both say FAILED_PRECONDITION, naming the manifest and the import
    command (before: ListModels said failed, Generate said NOT_FOUND)."""
    root = tmp_path / "adapters"
    save_lora_adapter(tiny_llama, root / "peer" / "1", rank=4)
    with serving(settings_for(tiny_llama, root)) as server:
        channel, stub = stub_for(server.port)
        with channel:
            listed = {a.ref: a for a in stub.ListModels(pb.ListModelsRequest()).adapters}
            assert listed["peer@1"].state == "failed"
            reason = listed["peer@1"].reason
            assert MANIFEST_NAME in reason and "lorafleet adapters import" in reason
            for ref in ("peer", "peer@1"):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(
                        pb.GenerateRequest(adapter=ref, prompt="hi", sampling=greedy(2)), timeout=30
                    )
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ref
                assert reason in info.value.details(), (ref, info.value.details())
                with pytest.raises(grpc.RpcError) as info:
                    stub.Chat(
                        pb.ChatRequest(
                            adapter=ref,
                            messages=[pb.ChatMessage(role="user", content="hi")],
                            sampling=greedy(2),
                        ),
                        timeout=30,
                    )
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ref


# ---------------------------------------------------------------------------------------------
# Import: checks, conversion, publish


class _WritesFile:
    """A pickled object whose ``__reduce__`` writes ``marker`` when unpickled: what a malicious
    ``adapter_model.bin`` carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def lora_dir(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora_adapter(
        tiny_llama, tmp_path_factory.mktemp("peft") / "lora", rank=4, targets=("q_proj", "v_proj")
    )


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny llama, hidden 32: every q/v projection has other shapes than ``tiny_llama``'s."""
    from lorafleet.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "narrow", arch="llama", hidden_size=32, num_layers=2, vocab_size=1200)


def _copy(src: Path, dst: Path, **config_changes: Any) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        config = json.loads((dst / ADAPTER_CONFIG).read_text())
        config.update(config_changes)
        (dst / ADAPTER_CONFIG).write_text(json.dumps(config))
    return dst


def _refusal(request: ImportRequest, root: Path) -> AdapterImportError:
    with pytest.raises(AdapterImportError) as info:
        import_adapter(request, root)
    assert not list_adapters(root), "a refused import published something"
    return info.value


def test_pickle_adapter_is_converted_checked_and_published(
    tiny_llama: Path, lora_dir: Path, tmp_path: Path
) -> None:
    src = _copy(lora_dir, tmp_path / "src", base_model_name_or_path=str(tiny_llama))
    state = load_file(str(src / SAFETENSORS_WEIGHTS))
    torch.save(state, src / PICKLE_WEIGHTS)
    (src / SAFETENSORS_WEIGHTS).unlink()
    root = tmp_path / "adapters"
    first = import_adapter(ImportRequest(str(src), "peer"), root)
    second = import_adapter(ImportRequest(str(src), "peer", template="alpaca"), root)
    assert (first.ref, second.ref) == ("peer@1", "peer@2")
    assert sorted(p.name for p in first.path.iterdir()) == [
        ADAPTER_CONFIG,
        SAFETENSORS_WEIGHTS,
        MANIFEST_NAME,
    ]
    converted = load_file(str(first.path / SAFETENSORS_WEIGHTS))
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    m = first.manifest
    assert (m.kind, m.method, m.family, m.template, second.manifest.template) == (
        "lora",
        "lora",
        "llama",
        "llama2",  # the llama family's default template
        "alpaca",
    )
    assert m.hyperparameters["lora"]["rank"] == 4
    assert (
        m.source["kind"] == "import"
        and m.source["weights_file"] == PICKLE_WEIGHTS
        and "weights_only" in m.source["converted"]
    )
    assert fingerprints_match(m.base_model, base_model_fingerprint(str(tiny_llama), None))
    assert verify_files(get_adapter(root, "peer", 1)) == []


def test_pickle_that_carries_code_is_refused_and_never_runs(lora_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "written-by-the-pickle"
    src = _copy(lora_dir, tmp_path / "src")
    state: dict[str, Any] = dict(load_file(str(src / SAFETENSORS_WEIGHTS)))
    state["payload"] = _WritesFile(marker)
    torch.save(state, src / PICKLE_WEIGHTS)
    (src / SAFETENSORS_WEIGHTS).unlink()
    error = _refusal(ImportRequest(str(src), "evil", base=str(lora_dir.parent)), tmp_path / "adapters")
    assert error.problems[0].field == PICKLE_WEIGHTS and "weights-only" in error.problems[0].message
    assert not marker.exists(), "the import ran code from the pickle"
    # The payload is live: an unrestricted load writes the file (what the import must never do).
    torch.load(src / PICKLE_WEIGHTS, weights_only=False)
    assert marker.read_text() == "pwned"


def test_corrupt_weights_are_refused(tiny_llama: Path, lora_dir: Path, tmp_path: Path) -> None:
    src = _copy(lora_dir, tmp_path / "src")
    data = (src / SAFETENSORS_WEIGHTS).read_bytes()
    (src / SAFETENSORS_WEIGHTS).write_bytes(data[: len(data) // 2])
    error = _refusal(ImportRequest(str(src), "cut", base=str(tiny_llama)), tmp_path / "adapters")
    assert error.problems[0].field == SAFETENSORS_WEIGHTS and "corrupt" in error.problems[0].message


def test_missing_targets_are_refused(tiny_llama: Path, lora_dir: Path, tmp_path: Path) -> None:
    src = _copy(lora_dir, tmp_path / "src", target_modules=["q_proj", "v_proj", "W_pack"])
    error = _refusal(ImportRequest(str(src), "fused", base=str(tiny_llama)), tmp_path / "adapters")
    assert [(p.field, p.value) for p in error.problems] == [(f"{ADAPTER_CONFIG}.target_modules", ["W_pack"])]
    assert "W_pack" in error.reason


def test_wrong_base_is_refused_by_fingerprint_and_by_shape(
    tiny_llama: Path, narrow_llama: Path, lora_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    # Recorded base is a local directory here: its weights must be the --base's.
    src = _copy(lora_dir, tmp_path / "local", base_model_name_or_path=str(tiny_llama))
    error = _refusal(ImportRequest(str(src), "other", base=str(narrow_llama)), root)
    fields = {p.field: p.value for p in error.problems}
    assert fields[f"{ADAPTER_CONFIG}.base_model_name_or_path"] == str(tiny_llama)
    # Recorded base is a hub id: the names cannot be compared, the shapes can.
    src = _copy(lora_dir, tmp_path / "hub", base_model_name_or_path="org/some-llama")
    error = _refusal(ImportRequest(str(src), "other", base=str(narrow_llama)), root)
    shapes = [p for p in error.problems if p.field.startswith("tensor ")]
    assert len(shapes) == 2 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in 2 layers
    assert "q_proj.lora_A" in error.reason and "[4, 64]" in error.reason


def test_rank_that_disagrees_with_the_config_is_refused(
    tiny_llama: Path, lora_dir: Path, tmp_path: Path
) -> None:
    src = _copy(lora_dir, tmp_path / "src", r=8)
    error = _refusal(ImportRequest(str(src), "rank", base=str(tiny_llama)), tmp_path / "adapters")
    assert all(p.field.startswith("tensor ") and "r=8" in p.message for p in error.problems)


def test_dora_and_prefix_adapters_import(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path / "adapters"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    dora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True, init_lora_weights=False
    )
    get_peft_model(base, dora).save_pretrained(str(tmp_path / "dora"))
    published = import_adapter(ImportRequest(str(tmp_path / "dora"), "dora", base=str(tiny_llama)), root)
    assert published.manifest.hyperparameters["lora"]["use_dora"] is True
    note = serving_note(json.loads((published.path / ADAPTER_CONFIG).read_text()))
    assert ("use_dora" in note) == (not LORA_OPTION_SERVABLE["use_dora"])
    assert any("lora_magnitude_vector" in k for k in load_file(str(published.path / SAFETENSORS_WEIGHTS)))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        str(tmp_path / "prefix")
    )
    published = import_adapter(ImportRequest(str(tmp_path / "prefix"), "prefix", base=str(tiny_llama)), root)
    assert (published.manifest.kind, published.manifest.hyperparameters["ptuning"]["num_virtual_tokens"]) == (
        "ptuning",
        3,
    )
    src = _copy(tmp_path / "prefix", tmp_path / "prefix-bad", num_layers=7)
    error = _refusal(ImportRequest(str(src), "prefix-bad", base=str(tiny_llama)), tmp_path / "other-root")
    assert [(p.field, p.value) for p in error.problems] == [(f"{ADAPTER_CONFIG}.num_layers", 7)]


def test_cli_imports_lists_and_refuses(
    tiny_llama: Path, lora_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import main

    root = str(tmp_path / "adapters")
    assert (
        main(
            ["adapters", "import", str(lora_dir), "--name", "cli", "--base", str(tiny_llama), "--root", root]
        )
        == 0
    )
    assert "imported" in capsys.readouterr().out
    assert main(["adapters", "--root", root]) == 0
    assert capsys.readouterr().out.startswith("cli@1\tlora\tllama2\t")
    bad = [
        "adapters",
        "import",
        str(lora_dir),
        "--name",
        "cli",
        "--base",
        str(tiny_llama),
        "--template",
        "nope",
    ]
    assert main([*bad, "--root", root]) == 2
    assert "template='nope'" in capsys.readouterr().err


def test_adapter_trained_by_plain_peft_is_imported_and_served_with_identical_tokens(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Round trip: PEFT code alone trains and saves (pickle, as older scripts do); lorafleet imports;
    a real inference server's greedy tokens equal ``PeftModel.generate``'s."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    batch = tokenizer(["患者主诉头痛三天 The patient reports a headache"], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    assert (tmp_path / "peft" / PICKLE_WEIGHTS).is_file()

    root = tmp_path / "adapters"
    published = import_adapter(ImportRequest(str(tmp_path / "peft"), "peer", base=str(tiny_llama)), root)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "peft")
    )
    prompt = "The patient reports"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = reference.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[0, ids.shape[1] :].tolist()
    with serving(settings_for(tiny_llama, root, max_new_tokens_cap=12)) as server:
        channel, stub = stub_for(server.port)
        with channel:
            sampling = greedy(12)
            got = stub.Generate(
                pb.GenerateRequest(adapter=published.ref, prompt=prompt, sampling=sampling), timeout=60
            )
            base = stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=60)
    n = len(got.token_ids)
    assert n > 0 and list(got.token_ids) == expected[:n]
    assert n == 12 or got.token_ids[-1] == tokenizer.eos_token_id  # stopped only at EOS
    assert list(got.token_ids) != list(base.token_ids), (
        "the adapter changed nothing: the test would prove nothing"
    )


def test_trainer_rpcs_import_and_export(tiny_llama: Path, lora_dir: Path, tmp_path: Path) -> None:
    """ImportAdapter / ExportAdapter through a real trainer server: sources only from the import
    directory, refusals with field violations, the merged model published as a full model."""
    from lorafleet.v1 import trainer_pb2 as tpb
    from services.common.field_errors import field_violations
    from services.trainer.adapter_ops import IMPORT_DIR
    from tests.trainer_utils import TrainerProcess

    root = tmp_path / "adapters"
    shutil.copytree(lora_dir, root / IMPORT_DIR / "peer")
    models = tmp_path / "models"
    shutil.copytree(tiny_llama, models / "llama")
    trainer = TrainerProcess(
        tmp_path / "state", root, ["--max-running", "0", "--model-roots", str(models)]
    ).start()
    try:
        stub = trainer.stub
        base = str(models / "llama")
        adapter = stub.ImportAdapter(
            tpb.ImportAdapterRequest(source="peer", name="peer", base=base), timeout=120
        )
        assert adapter.ref == "peer@1" and json.loads(adapter.manifest_json)["source"]["kind"] == "import"
        for request, code, field in [
            (
                tpb.ImportAdapterRequest(source="../peer", name="x", base=base),
                grpc.StatusCode.INVALID_ARGUMENT,
                "source",
            ),
            (
                tpb.ImportAdapterRequest(source="peer", name="x", base=str(tiny_llama)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "base",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ImportAdapter(request, timeout=60)
            assert info.value.code() == code and [v.field for v in field_violations(info.value)] == [field]
        config = json.loads((root / IMPORT_DIR / "peer" / ADAPTER_CONFIG).read_text())
        (root / IMPORT_DIR / "peer" / ADAPTER_CONFIG).write_text(
            json.dumps({**config, "target_modules": ["W_pack"]})
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.ImportAdapter(tpb.ImportAdapterRequest(source="peer", name="x", base=base), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        violations = field_violations(info.value)
        assert [v.field for v in violations] == [f"{ADAPTER_CONFIG}.target_modules"]
        assert "W_pack" in violations[0].description
        merged = stub.ExportAdapter(
            tpb.ExportAdapterRequest(ref="peer@1", publish_name="peer-merged"), timeout=300
        )
        assert merged.adapter.ref == "peer-merged@1" and merged.notice == ""
        assert json.loads(merged.adapter.manifest_json)["kind"] == "full_model"
        with pytest.raises(grpc.RpcError) as info:
            stub.ExportAdapter(
                tpb.ExportAdapterRequest(ref="peer@1", publish_name="m", dtype="int4"), timeout=60
            )
        assert [v.field for v in field_violations(info.value)] == ["dtype"]
    finally:
        trainer.stop()
