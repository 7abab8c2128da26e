"""YAML that cannot cost more to load than its size: a ``SafeLoader`` that refuses anchors, aliases
and deep nesting. Run configs, overrides and the inference settings file load through it.

Aliases let a few hundred bytes expand exponentially ("billion laughs"); deep nesting makes PyYAML's
recursive composer overflow the stack. A settings file needs neither.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_DEPTH = 16
"""Nesting of YAML collections in an override value or a settings file; a run config needs 3."""


class UnsafeYamlError(yaml.YAMLError):
    """YAML that could cost far more to load than its size: anchors, aliases, deep nesting."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors and aliases and nests at most :data:`MAX_YAML_DEPTH` deep."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise UnsafeYamlError("YAML anchors and aliases (&name, *name) are not accepted")
        if self._depth >= MAX_YAML_DEPTH:
            raise UnsafeYamlError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep is not accepted")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_bounded_yaml(text: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load``, refusing anchors, aliases and deep nesting.

    Raises:
        UnsafeYamlError: anchors, aliases or nesting past :data:`MAX_YAML_DEPTH`.
        yaml.YAMLError: malformed YAML.
    """
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
