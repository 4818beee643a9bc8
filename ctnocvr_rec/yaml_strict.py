"""Strict YAML reading for every YAML file the tool loads (run configs, experiment presets, field
schemas, plan presets) and for ``-o key=value`` values.

``yaml.safe_load`` already refuses Python tags (``!!python/object``), but with a multi-line traceback;
it silently keeps the *last* of two equal keys in a mapping; and its syntax errors are multi-line too.
Here each of these is a :class:`YamlError` (a ``ValueError``, so the CLI prints it as one
``error:`` line and exits 2) naming the source and the line::

    configs/x.yaml:7:3: duplicate key 'epochs' (first at line 4)
    configs/x.yaml:2:7: tag !!python/object:os.system is not allowed (plain YAML only)
    -o model.tower_hidden=[1,: expected ',' or ']', but got '<stream end>'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode


class YamlError(ValueError):
    """A YAML text that cannot be read: syntax error, unsafe tag or duplicate key (names the line)."""


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (with both lines)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader itself reports it
                continue
            if first is not None:
                raise ConstructorError(None, None, f"duplicate key {key!r} (first at line {first})",
                                       key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _one_line(error: yaml.YAMLError, source: str, with_line: bool) -> str:
    """``source:line:column: problem`` (the mark of the problem, else of the context)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if problem.startswith("could not determine a constructor for the tag"):
        tag = problem.split("tag", 1)[1].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        problem = f"tag {tag} is not allowed (plain YAML only: no Python objects)"
    elif context and "duplicate key" not in problem:
        problem = f"{context}: {problem}"
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if (mark is not None and with_line) else source
    return f"{where}: {problem}"


def load_yaml_file(path: str | Path) -> Any:
    """The YAML document of ``path`` (``None`` for an empty file); :class:`YamlError` names file:line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not part of the YAML
            text = f.read()
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise YamlError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise YamlError(_one_line(e, str(path), with_line=True)) from None


def parse_yaml_value(text: str, source: str) -> Any:
    """A YAML scalar / flow value given on the command line (``source``: e.g. ``-o key=value``)."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506
    except yaml.YAMLError as e:
        raise YamlError(_one_line(e, source, with_line="\n" in text)) from None
