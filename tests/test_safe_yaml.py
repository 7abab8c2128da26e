"""The inference settings file loads through the same bounded YAML loader as run configs: an alias
chain ("billion laughs") or deep nesting is refused at once, naming the file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lorafleet.errors import ConfigError
from lorafleet.safe_yaml import UnsafeYamlError, load_bounded_yaml
from services.inference.settings import load_yaml

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize("text", [BOMB, "models: " + "[" * 50 + "]" * 50])
def test_settings_file_refuses_aliases_and_deep_nesting(tmp_path: Path, text: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert time.monotonic() - started < 5
    assert err.value.problems[0].field == "--config" and "not accepted" in err.value.reason


def test_plain_yaml_loads_as_safe_load_would() -> None:
    assert load_bounded_yaml("port: 5\nmodels: [{name: a, path: /m}]") == {
        "port": 5,
        "models": [{"name": "a", "path": "/m"}],
    }
    with pytest.raises(UnsafeYamlError):
        load_bounded_yaml("x: &a 1\ny: *a")
