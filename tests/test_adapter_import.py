"""Importing plain PEFT adapters (``lorafleet.adapter_import``): checks against the base, pickle
conversion without running code, manifest and atomic publish; the inference service's one answer
for a directory without a manifest; and a round trip from plain PEFT training to served tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from lorafleet.adapters import MANIFEST_NAME
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
