"""YAML from users' files, read safely: no tags that build Python objects (``safe_load``), no
nesting deep enough to overflow the parser, and no alias bombs ("billion laughs": a few lines of
anchors and aliases that expand to billions of nodes, which later copies or prints would try to
build). Beside :mod:`denseseg.errors` at the bottom of the package: imports only PyYAML.
"""

from __future__ import annotations

from typing import Any

import yaml

from denseseg.errors import ConfigError, DensesegError

MAX_NODES = 100_000
"""Most values (counted with every alias expanded) a recipe or class list may hold."""


def load_yaml(text: str, source: str, error: type[DensesegError] = ConfigError) -> Any:
    """Parse ``text`` (the content of file ``source``) as YAML.

    Raises:
        DensesegError: ``error`` naming ``source``: not valid YAML, nested too deeply, or more
            than :data:`MAX_NODES` values once its aliases are expanded.
    """
    try:
        data = yaml.safe_load(text)  # safe: tags such as !!python/object are refused
    except (yaml.YAMLError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        if isinstance(exc, RecursionError):
            first = "nested too deeply"
        raise error(f"{source}: not valid YAML ({first})") from None
    check_size(data, source, error)
    return data


def check_size(data: Any, source: str, error: type[DensesegError] = ConfigError) -> None:
    """Refuse parsed YAML with more than :data:`MAX_NODES` values once aliases are expanded."""
    if _expanded_size(data, {}, 0) > MAX_NODES:
        raise error(
            f"{source}: holds more than {MAX_NODES} values once its YAML aliases (*name) are "
            "expanded; write the values out"
        )


def _expanded_size(obj: Any, seen: dict[int, int], depth: int) -> int:
    """Number of values in ``obj`` with aliases expanded; shared objects are counted once per
    reference from a memo, so a bomb is measured without being built."""
    if not isinstance(obj, dict | list):
        return 1
    if id(obj) in seen:
        return seen[id(obj)]
    if depth > 500:  # deeper than any real recipe; the parser's own limit is near here too
        return MAX_NODES + 1
    children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
    size = 1
    for child in children:
        size += _expanded_size(child, seen, depth + 1)
        if size > MAX_NODES:
            break
    seen[id(obj)] = size
    return size
