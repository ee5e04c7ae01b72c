"""Reading untrusted YAML: the safe loader only, a size cap, alias bombs measured rather
than expanded, and a key given twice refused (PyYAML would keep the last one silently)."""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from jaxdream.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
#: Values once aliases are expanded: 1 MiB holds ~500,000 without aliases; only a bomb gets here.
MAX_VALUES = 1_000_000

# Short reprs keep messages to one readable line whatever a hostile file holds.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
show = _SHORT.repr


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """Values in ``node`` with aliases expanded, each shared object sized once, so a YAML bomb
    is measured, never expanded. A value containing itself ends in RecursionError."""
    if not isinstance(node, (list, dict, set)):
        return 1
    if id(node) not in sizes:
        children = node.values() if isinstance(node, dict) else node
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _duplicate_key(node: yaml.Node, path: str, seen: set[int]) -> str | None:
    """The first key written twice in one mapping, as ``path (lines A and B)``, or None. Nodes
    reached again through an alias are walked once, so an alias bomb costs its size on disk."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            child = f"{path}.{name}" if path else name
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    return (f"{show(child)[1:-1]}: duplicate key (lines "
                            f"{first[key.tag, key.value]} and {line}); give each key once")
                first[key.tag, key.value] = line
            children.append((child, value))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
    for child, value in children:
        found = _duplicate_key(value, child, seen)
        if found:
            return found
    return None


def _load_unique_keys(source: str, text: str) -> Any:
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so ``output:`` written twice would quietly change where results go)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicate = _duplicate_key(node, "", set())
        if duplicate:
            raise ConfigError(f"{source}: {duplicate}")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(source: str) -> Any:
    """A YAML file's data, read with the safe loader only, at most :data:`MAX_FILE_BYTES`,
    aliases measured (not expanded) against :data:`MAX_VALUES`, duplicate keys refused; every
    problem one ConfigError naming the file."""
    try:
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise ConfigError(f"{source}: cannot read the config: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: too large for a config (over {MAX_FILE_BYTES} bytes)")
    try:
        data = _load_unique_keys(source, raw.decode("utf-8"))
        size = _expanded_size(data, {})
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text (byte {error.start})") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as error:
        # ValueError and friends come from PyYAML's own constructors (e.g. the date 2024-13-45);
        # its own errors quote the text over several lines, so take the problem and its place.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"{source}: not valid YAML: {reason}{where}") from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply, or a value contains itself "
                          f"(recursive alias)") from None
    if data is None:
        raise ConfigError(f"{source}: the config is empty")
    if size > MAX_VALUES:
        raise ConfigError(f"{source}: refused: more than {MAX_VALUES} values once aliases are "
                          f"expanded")
    return data


