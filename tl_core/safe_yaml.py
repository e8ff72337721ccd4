"""YAML read safely: the safe loader, and no alias that refers to itself or expands past MAX_YAML_VALUES
("billion laughs"). Errors are one line naming the source and where. Numbers and booleans are read as YAML 1.2 (and
every Python YAML user) expects: `1e-4` is a float, where YAML 1.1 wants `1.0e-4` and reads `1e-4` as text; `off`,
`on`, `yes`, `no` are words, where YAML 1.1 reads them as booleans (`train.amp: off` was false, which amp refused);
a boolean key takes them as pydantic does. What this module writes quotes such text, so it reads back as written."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tl_core.errors import ConfigError

MAX_YAML_VALUES = 100_000  # far more than any config; an alias bomb ("billion laughs") expands beyond it

# A number with an exponent, as YAML 1.2 writes one: 1e-4, 3E5, +2.5e3, .5e-2 (YAML 1.1 needs a dot and a signed exponent).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):  # the dumper resolves alike, so it quotes the text "1e5" that the loader would read as 1e5
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {  # YAML 1.2's booleans only; the dumper keeps 1.1's, so it quotes `off` and `yes`
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str, source: str) -> Any:
    """YAML `text` with the safe loader, refusing aliases that refer to themselves or expand past MAX_YAML_VALUES."""
    try:
        return _load(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "'\\t'" in problem:  # an editor's tab, which YAML never takes for indentation
            problem += "; YAML wants spaces there, not a tab"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _load(text: str, source: str) -> Any:
    """What yaml.load does, with the alias count between parsing and building, so the text is parsed once."""
    loader = _Loader(text)  # the safe loader, one more number form
    try:
        node = loader.get_single_node()
        _count_values(node, source, {}, set())
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def dump_yaml(value: Any, **kwargs: Any) -> str:
    """`value` as YAML that parse_yaml reads back equal (yaml.safe_dump's keyword arguments)."""
    return yaml.dump(value, Dumper=_Dumper, **kwargs)


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
        _check_unique_keys(node, source)
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


def _check_unique_keys(node: yaml.MappingNode, source: str) -> None:
    """A key written twice in one mapping (two `data:` sections) is refused: YAML loaders keep the last and drop the
    first without a word. Keys merged in with `<<: *alias` may be overridden, as YAML means them to be."""
    first_line: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if key.value in first_line:
            raise ConfigError(f"{source}: line {line}: {key.value} is given twice (first at line {first_line[key.value]}); "
                              "the first would be silently dropped: keep one")
        first_line[key.value] = line
