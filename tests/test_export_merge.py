"""``lorafleet export --merge``: a published adapter merged into its base as a standalone Hugging Face
model directory; logits equal PeftModel's on the unmerged adapter, plain transformers loads it in a
process that never imports lorafleet, a quantized base is dequantized first and the result says so,
and the tokenizer carries the adapter's template as its chat_template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from lorafleet.adapters import Manifest, PublishedAdapter, get_adapter, new_staging_dir, publish, utc_now
from lorafleet.errors import AdapterImportError
from lorafleet.export import MERGE_RECORD, jinja_chat_template, merge_adapter
from lorafleet.models import base_model_fingerprint
from lorafleet.templates import TEMPLATES, render_turns
from tests.inference_utils import load_base, peft_model, save_lora_adapter

PROMPTS = ["The patient reports a headache and", "患者主诉头痛三天，伴有恶心"]

# Loads the merged directory with transformers alone and prints its logits and chat rendering; fails
# if anything imported lorafleet.
_PLAIN_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
ids = json.loads(sys.argv[2])
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([row])).logits[0].tolist() for row in ids]
chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
assert not any(name.startswith("lorafleet") for name in sys.modules), "lorafleet was imported"
print(json.dumps({"logits": logits, "chat": chat}))
"""


def _publish(
    root: Path, name: str, adapter: Path, base: Path, *, template: str, quantization: str = "none"
) -> PublishedAdapter:
    staging = new_staging_dir(root, name)
    shutil.copytree(adapter, staging, dirs_exist_ok=True)
    manifest = Manifest(
        name=name,
        version=0,
        kind="lora",
        method="qlora" if quantization == "nf4" else "lora",
        base_model=base_model_fingerprint(str(base), None),
        family="llama",
        template=template,
        hyperparameters={"lora": {"rank": 4}, "model": {"dtype": "fp32", "quantization": quantization}},
        created_at=utc_now(),
    )
    return publish(staging, root, name, manifest)


def _ids(base: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@torch.inference_mode()
def _logits(model: Any, ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([row])).logits[0].float() for row in ids]


def _plain_load(out: Path, ids: list[list[int]]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(out), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if not t.use_chat_template])
def test_chat_template_renders_as_the_lorafleet_template(tiny_llama: Path, name: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    template = TEMPLATES[name]
    jinja = jinja_chat_template(template)
    turns = [("患者主诉头痛 {x}", "answer one\n"), ("second question", "")]
    for system in ("You are careful.", None):
        pieces = render_turns(template, tokenizer, turns, system)
        expected = "".join(p + r for p, r in pieces[:-1]) + pieces[-1][0]
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [
            {"role": "user", "content": turns[0][0]},
            {"role": "assistant", "content": turns[0][1]},
            {"role": "user", "content": turns[1][0]},
        ]
        got = tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        assert got == expected, (name, system)


def test_merged_model_equals_peft_and_loads_with_plain_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False
    )
    base = load_base(tiny_llama)
    get_peft_model(base, config).save_pretrained(str(tmp_path / "dora"))
    published = _publish(tmp_path / "adapters", "dora", tmp_path / "dora", tiny_llama, template="chatml")
    result = merge_adapter(published, tmp_path / "merged", "fp32")
    assert (
        result.notice == ""
        and json.loads((tmp_path / "merged" / MERGE_RECORD).read_text())["adapter"] == "dora@1"
    )
    ids = _ids(tiny_llama)
    reference = _logits(peft_model(load_base(tiny_llama), {"dora": published.path}), ids)
    unadapted = _logits(load_base(tiny_llama), ids)
    plain = _plain_load(tmp_path / "merged", ids)
    for ref, base_logits, got in zip(reference, unadapted, plain["logits"], strict=True):
        got_t = torch.tensor(got)
        assert (ref - base_logits).abs().max() > 0.05, (
            "the adapter changes nothing: the test would prove nothing"
        )
        torch.testing.assert_close(got_t, ref, atol=1e-4, rtol=1e-4)
    assert plain["chat"] == render_turns(TEMPLATES["chatml"], None, [("hi", "")], None)[0][0]
    assert plain["chat"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_merge_into_an_nf4_base_dequantizes_and_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    """The adapter was trained over nf4: the merged weights must be the dequantized nf4 weights plus
    the update (what PeftModel over the nf4 base computes), not the original fp32 weights plus it."""
    adapter = save_lora_adapter(
        tiny_llama, tmp_path / "lora", rank=4, targets=("q_proj", "v_proj", "up_proj")
    )
    published = _publish(
        tmp_path / "adapters", "q", adapter, tiny_llama, template="chatml", quantization="nf4"
    )
    result = merge_adapter(published, tmp_path / "merged", "fp32")
    assert "nf4" in result.notice and "dequantized" in result.notice
    record = json.loads((tmp_path / "merged" / MERGE_RECORD).read_text())
    assert record["base_quantization"] == "nf4" and record["dequantized"] == result.notice
    ids = _ids(tiny_llama)
    over_nf4 = _logits(peft_model(load_base(tiny_llama, quantization="nf4"), {"q": adapter}), ids)
    over_fp32 = _logits(peft_model(load_base(tiny_llama), {"q": adapter}), ids)
    plain = _plain_load(tmp_path / "merged", ids)
    for nf4_ref, fp32_ref, got in zip(over_nf4, over_fp32, plain["logits"], strict=True):
        got_t = torch.tensor(got)
        exact = (got_t - nf4_ref).abs().max().item()
        naive = (fp32_ref - nf4_ref).abs().max().item()
        # The nf4 reference runs its quantized layers in bf16 (QLoRA's compute dtype), the merged
        # model in fp32: bf16 rounding bounds the first; the naive merge is off by the quantization.
        assert exact < 0.05 and naive > 10 * exact, (exact, naive)


def test_cli_merges_and_publishes_a_full_model(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import main

    root = tmp_path / "adapters"
    adapter = save_lora_adapter(tiny_llama, tmp_path / "lora", rank=4)
    _publish(root, "doc", adapter, tiny_llama, template="alpaca")
    assert main(["export", "doc@1", "--merge", "--publish", "doc-merged", "--root", str(root)]) == 0
    assert "doc-merged@1" in capsys.readouterr().out
    merged = get_adapter(root, "doc-merged")
    assert (merged.manifest.kind, merged.manifest.template) == ("full_model", "alpaca")
    assert merged.manifest.source["adapter"] == "doc@1" and merged.manifest.source["dtype"] == "bf16"
    with safe_open(str(merged.path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {"BF16"}
    tokenizer_config = json.loads((merged.path / "tokenizer_config.json").read_text())
    chat_template = tokenizer_config.get("chat_template") or (merged.path / "chat_template.jinja").read_text()
    assert "### Instruction" in chat_template
    # Refusals name the field and the value.
    assert main(["export", "doc@1", "--merge", "--out", str(merged.path), "--root", str(root)]) == 2
    assert "out=" in capsys.readouterr().err


def test_merge_refuses_a_prompt_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    staging = new_staging_dir(tmp_path, "p")
    (staging / "adapter_config.json").write_text("{}")
    manifest = Manifest(
        name="p",
        version=0,
        kind="ptuning",
        method="ptuning",
        base_model=base_model_fingerprint(str(tiny_llama), None),
        created_at=utc_now(),
    )
    published = publish(staging, tmp_path, "p", manifest)
    with pytest.raises(AdapterImportError) as info:
        merge_adapter(published, tmp_path / "out", "fp32")
    assert [(p.field, p.value) for p in info.value.problems] == [("kind", "ptuning")]


def test_dashboard_export_action_publishes_the_merged_model(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapters page's Export action, against a real trainer service (no inference service: the
    page says so and export still works)."""
    from tests.dashboard_utils import errors, no_exception, open_page
    from tests.trainer_utils import TrainerProcess

    root = tmp_path / "adapters"
    adapter = save_lora_adapter(tiny_llama, tmp_path / "lora", rank=4)
    _publish(root, "dash", adapter, tiny_llama, template="chatml")
    trainer = TrainerProcess(tmp_path / "state", root, ["--max-running", "0"]).start()
    try:
        env = {
            "LORAFLEET_TRAINER_ADDR": trainer.address,
            "LORAFLEET_INFERENCE_ADDR": "127.0.0.1:1",
            "LORAFLEET_DASHBOARD_METRICS_PORT": "0",
            "LORAFLEET_DASHBOARD_REFRESH_S": "1",
        }
        at = open_page(monkeypatch, env, "adapters", timeout=300)
        no_exception(at)
        at.text_input(key="adapters.export_name").set_value("dash-full")
        at.selectbox(key="adapters.export_dtype").set_value("fp32")
        at.button(key="adapters.export").click().run()
        no_exception(at)
        assert any("published as dash-full@1" in str(s.value) for s in at.success), errors(at)
    finally:
        trainer.stop()
    merged = get_adapter(root, "dash-full")
    assert merged.manifest.kind == "full_model" and merged.manifest.source["dtype"] == "fp32"
