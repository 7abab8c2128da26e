"""``make proto-check`` (the last step of ``make quality``, so of CI): the committed gRPC stubs must
equal what ``make proto`` generates from proto/ now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def proto_check(stubs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-o", ".venv/.installed", f"PY={sys.executable}", "proto-check", f"STUBS={stubs}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    copy = tmp_path / "v1"
    shutil.copytree(ROOT / "lorafleet" / "v1", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_committed_stubs_are_fresh() -> None:
    done = proto_check(ROOT / "lorafleet" / "v1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "proto stubs: up to date" in done.stdout


def test_a_hand_edited_stub_fails(stubs: Path) -> None:
    with (stubs / "trainer_pb2.pyi").open("a") as f:
        f.write("# edited by hand\n")
    done = proto_check(stubs)
    assert done.returncode != 0 and "run make proto" in done.stderr
    assert "edited by hand" in done.stdout


def test_a_stub_without_its_proto_fails(stubs: Path) -> None:
    shutil.copy(stubs / "adapters_pb2.py", stubs / "retired_pb2.py")
    done = proto_check(stubs)
    assert done.returncode != 0 and "retired_pb2.py" in done.stdout
