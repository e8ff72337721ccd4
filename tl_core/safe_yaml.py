"""YAML read safely: the safe loader, and no alias that refers to itself or expands past MAX_YAML_VALUES
("billion laughs"). Errors are one line naming the source and where."""

from __future__ import annotations

from typing import Any

import yaml

from tl_core.errors import ConfigError

MAX_YAML_VALUES = 100_000  # far more than any config; an alias bomb ("billion laughs") expands beyond it


def parse_yaml(text: str, source: str) -> Any:
    """YAML `text` with the safe loader, refusing aliases that refer to themselves or expand past MAX_YAML_VALUES."""
    try:
        _count_values(yaml.compose(text, Loader=yaml.SafeLoader), source, {}, set())
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _count_values(node: yaml.Node | None, source: str, counted: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (shared nodes counted once per use)."""
    if node is None:
        return 0
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{source}: a YAML alias refers to the node that contains it")
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_count_values(k, source, counted, open_nodes) + _count_values(v, source, counted, open_nodes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_count_values(v, source, counted, open_nodes) for v in node.value)
    else:
        total = 1
    open_nodes.discard(id(node))
    if total > MAX_YAML_VALUES:
        raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values through its aliases")
    counted[id(node)] = total
    return total
