"""``services.inference.lora_batch`` on its own: the PEFT adapter reader, the slot tables and their
three ways of applying LoRA (``group``, ``gather``, ``stack``), the ``auto`` choice between them.
The engine that drives them is tested in ``test_inference_engine.py``; fixtures are in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.inference.lora_batch import LoraSlots, adapter_weights_from_peft_dir
from tests.inference_utils import ADAPTERS, References, load_base


@pytest.mark.parametrize("mode", ["group", "gather", "stack"])
def test_nf4_slot_delta_matches_peft_logits(
    tiny_llama: Path,
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    nf4_refs: References,
    mode: str,
) -> None:
    """One forward over the nf4 base, a batch of an adapter row and a base row: the adapter row's
    logits equal PeftModel's over the same nf4 base, the base row's the plain nf4 base's. ``group``
    is bitwise equal (PEFT's own operations); ``gather`` within 1e-4 (batched matmuls over padded
    ranks sum in another order; logits here are of order 10, so that is float32 rounding)."""
    base = load_base(tiny_llama, quantization="nf4")
    slots = LoraSlots(base, None, num_slots=2, max_rank=16, mode=mode)  # type: ignore[arg-type]
    slots.load(1, adapter_weights_from_peft_dir(adapter_dirs["b"], "b@1", base))
    ids = torch.tensor([prompts[1], prompts[1]])
    with torch.inference_mode():
        slots.set_rows(torch.tensor([1, -1]))
        ours = base(input_ids=ids).logits
        theirs = nf4_refs.model("b")(input_ids=ids[:1]).logits
        their_base = nf4_refs.model(None)(input_ids=ids[:1]).logits
    if mode == "group":
        assert torch.equal(ours[:1], theirs)
        assert torch.equal(ours[1:], their_base)
    else:
        assert (ours[:1] - theirs).abs().max() < 1e-4
        assert torch.equal(ours[1:], their_base)  # base rows add an exact zero
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the adapter is applied at all


def test_bad_adapter_directories(tiny_llama: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The adapter reader refuses pickle-only, non-LoRA, other-architecture and inconsistent adapters
    with a message saying what is wrong."""
    base = load_base(tiny_llama)
    good = adapter_dirs["a"]

    def variant(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(good, out)
        return out

    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        adapter_weights_from_peft_dir(tmp_path, "x", base)
    pickle_only = variant("pickle")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        adapter_weights_from_peft_dir(pickle_only, "x", base)
    for key, value, message in [
        ("peft_type", "PREFIX_TUNING", "not LORA"),
        ("use_dora", True, "DoRA"),
        ("r", 6, "rank 4 but adapter_config.json says 6"),
    ]:
        bad = variant(f"cfg-{key}")
        config = json.loads((bad / "adapter_config.json").read_text())
        config[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            adapter_weights_from_peft_dir(bad, "x", base)
    # The same adapter against a base of another width: shapes do not fit.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = base.config.to_dict()
    cfg.update(hidden_size=32, intermediate_size=64, head_dim=8)
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(ValueError, match="do not fit"):
        adapter_weights_from_peft_dir(good, "x", other)


def test_stack_mode_repacks_after_reload_and_clear(
    tiny_llama: Path, adapter_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    """``stack`` multiplies packed copies of the slot tables; a slot loaded with another adapter or
    cleared must never be served from the old packed copy. Checked against ``group`` (PEFT's own
    arithmetic) on the same slots after each change."""
    base = load_base(tiny_llama)
    slots = LoraSlots(base, None, num_slots=3, max_rank=16, mode="stack")
    weights = {n: adapter_weights_from_peft_dir(adapter_dirs[n], f"{n}@1", base) for n in ADAPTERS}
    ids = torch.tensor([prompts[0][:4]] * 4)
    rows = torch.tensor([0, 1, 2, -1])

    def logits(mode: str) -> torch.Tensor:
        slots.mode = mode  # type: ignore[assignment]
        slots.set_rows(rows)
        with torch.inference_mode():
            return base(input_ids=ids[:, :1]).logits

    try:
        for slot, name in enumerate(("a", "b", "c")):
            slots.load(slot, weights[name])
        first = logits("stack")
        assert (first - logits("group")).abs().max() < 1e-4
        slots.load(1, weights["d"])  # replace b by d in slot 1
        second = logits("stack")
        assert (second - logits("group")).abs().max() < 1e-4
        assert (second[1] - first[1]).abs().max() > 1e-3  # slot 1 really serves d now
        assert torch.equal(second[0], first[0]) and torch.equal(second[3], first[3])
        slots.clear(2)  # rows of a cleared slot get the base model's output
        third = logits("stack")
        assert (third[2] - third[3]).abs().max() < 1e-5
    finally:
        slots.remove()


def test_auto_mode_choice(tiny_llama: Path, adapter_dirs: dict[str, Path]) -> None:
    """``auto``: ``group`` for at most two adapters in a batch; above that ``stack`` for one-token
    (decode) forwards and ``gather`` for prefills while the resident ranks fit the narrowest
    layer's input size, and ``gather`` for both once they do not."""
    base = load_base(tiny_llama)
    narrowest = min(
        m.in_features
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    w = {n: adapter_weights_from_peft_dir(adapter_dirs[n], f"{n}@1", base) for n in ADAPTERS}
    slots = LoraSlots(base, None, num_slots=4, max_rank=16)
    try:
        for slot, name in enumerate(ADAPTERS):
            slots.load(slot, w[name])
        slots.set_rows(torch.tensor([0, 1, 0, -1]))
        assert slots._plan is not None and slots._plan.mode == "group"
        slots.set_rows(torch.tensor([0, 1, 2, 3]))
        assert sum(x.rank for x in w.values()) <= narrowest
        assert (slots._plan.mode, slots._plan.multi_token_mode) == ("stack", "gather")
        slots._min_in = sum(x.rank for x in w.values()) - 1  # as if the layers were narrower
        slots.set_rows(torch.tensor([0, 1, 2, 3]))
        assert (slots._plan.mode, slots._plan.multi_token_mode) == ("gather", "gather")
    finally:
        slots.remove()


def test_lora_slots_argument_checks(tiny_llama: Path, adapter_dirs: dict[str, Path]) -> None:
    base = load_base(tiny_llama)
    with pytest.raises(ValueError, match="num_slots"):
        LoraSlots(base, None, num_slots=0, max_rank=8)
    with pytest.raises(ValueError, match="mode"):
        LoraSlots(base, None, num_slots=1, max_rank=8, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['nonexistent_proj'\] match no linear layer"):
        LoraSlots(base, ["q_proj", "nonexistent_proj"], num_slots=1, max_rank=8)
    slots = LoraSlots(base, None, num_slots=2, max_rank=8)
    try:
        with pytest.raises(ValueError, match="slot ids must be in"):
            slots.set_rows(torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="slot 5 out of range"):
            slots.load(5, adapter_weights_from_peft_dir(adapter_dirs["a"], "a@1", base))
    finally:
        slots.remove()
