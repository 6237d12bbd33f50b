"""YAML with a location for every value: each mapping key and list item keeps the `file:line` it was written on.

Parsing refuses what a workflow never needs and a hostile file could abuse: duplicate and non-string keys, tags other
than the plain ones, nesting, aliases and `<<` merges beyond fixed bounds. `deep_merge` merges documents (include,
extends) keeping the locations of what each value came from.
"""
from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple

import yaml

from vlflow.errors import WorkflowError

MAX_YAML_DEPTH = 64  # nesting of mappings and lists in one document
MAX_YAML_VALUES = 100_000  # values of one document after alias expansion
MAX_YAML_ALIASES = 1_000  # `*name` uses in one document
# Tags a workflow may use explicitly; anything else (`!!python/object`, `!custom`, `!!binary`, `!!set`) is refused.
ALLOWED_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("map", "seq", "str", "int", "float", "bool", "null",
                                                          "merge")}


class Location(NamedTuple):
    file: str | None
    line: int | None


KeyPath = tuple  # a path of keys into the document: ("stages", "train", "with", "max_steps"); list items by index
Locations = dict  # KeyPath -> Location


def dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


class YamlLoader(yaml.SafeLoader):
    """SafeLoader without the timestamp resolver: `2021-01-01` stays a string (stage params are JSON values).

    Composing refuses nesting deeper than MAX_YAML_DEPTH (PyYAML's composer recurses per level)."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0
        self.values = 0  # values constructed so far, aliases expanded (bounded: billion laughs)
        self.aliases = 0

    def flatten_mapping(self, node, active: frozenset = frozenset()):
        """PyYAML's `<<` merge, refusing a merge that would copy more than MAX_YAML_VALUES keys (each merged
        mapping's keys are copied into the merging one, so chained merges multiply like aliases do)."""
        total = len(node.value)
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                continue
            for sub in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                if not isinstance(sub, yaml.MappingNode):
                    continue  # PyYAML's own flatten_mapping reports it
                if id(sub) in active or sub is node:
                    raise WorkflowError("recursive YAML merge (`<<`) of a mapping into itself", file=self.file,
                                        line=sub.start_mark.line + 1)
                self.flatten_mapping(sub, active | {id(node)})
                total += len(sub.value)
                if total > MAX_YAML_VALUES:
                    raise WorkflowError(f"`<<` merges copy more than {MAX_YAML_VALUES:,} keys (is this a merge "
                                        "bomb?)", file=self.file, line=key_node.start_mark.line + 1)
        super().flatten_mapping(node)

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise WorkflowError(f"mappings and lists nest more than {MAX_YAML_DEPTH} levels deep",
                                    file=self.file, line=mark.line + 1)
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:  # refused while parsing, before anything is expanded
                    raise WorkflowError(f"more than {MAX_YAML_ALIASES:,} YAML aliases (*name) in one file",
                                        file=self.file, line=self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]  # `=` stays a string
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float.
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, file: str) -> tuple[Any, Locations]:
    """Parse one YAML document into plain data and the line of every mapping key / sequence item."""
    try:
        loader = YamlLoader(text, file)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, control characters)
        raise _reader_error(exc, text, file) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {(): Location(file, 1)}
        locations: Locations = {(): Location(file, root.start_mark.line + 1)}
        data = _from_node(loader, root, (), locations, file, active=set())
        return data, locations
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem or "\t" in problem:
            problem = "tab character; YAML indentation must use spaces"
        elif exc.context and exc.problem and exc.problem.startswith("but "):
            problem = f"{exc.context}, {exc.problem}"
        elif exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        raise WorkflowError(f"invalid YAML: {problem}", file=file,
                            line=None if mark is None else mark.line + 1) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}", file=file) from None
    finally:
        loader.dispose()


def _reader_error(exc: yaml.reader.ReaderError, text: str, file: str) -> WorkflowError:
    character = exc.character
    code = ord(character) if isinstance(character, str) else character
    line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
    return WorkflowError(f"invalid YAML: character U+{code:04X} is not allowed (control characters, NUL bytes and "
                         "unpaired surrogates cannot appear in YAML; write them as escapes in a double-quoted "
                         "string)", file=file, line=line)


def _check_tag(node: yaml.Node, path: KeyPath, file: str) -> None:
    if node.tag not in ALLOWED_TAGS:
        raise WorkflowError(f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed (workflows "
                            "hold plain mappings, lists, strings, numbers, booleans and null)", file=file,
                            line=node.start_mark.line + 1, field=dotted(path) or None)


def _from_node(loader: YamlLoader, node: yaml.Node, path: KeyPath, locations: Locations, file: str,
               active: set[int]) -> Any:
    loader.values += 1
    if loader.values > MAX_YAML_VALUES:
        raise WorkflowError(f"the document expands to more than {MAX_YAML_VALUES:,} values (YAML aliases such as "
                            "*name repeat what they refer to; is this an alias bomb?)", file=file,
                            line=node.start_mark.line + 1, field=dotted(path) or None)
    _check_tag(node, path, file)
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node)
    if id(node) in active:  # an alias inside itself (`a: &x [*x]`)
        raise WorkflowError("recursive YAML alias", file=file, line=node.start_mark.line + 1, field=dotted(path))
    active = active | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            item_path = (*path, index)
            locations[item_path] = Location(file, item.start_mark.line + 1)
            items.append(_from_node(loader, item, item_path, locations, file, active))
        return items
    # A mapping. Duplicate keys are errors (PyYAML keeps the last silently); `<<` merge keys are allowed to be
    # overridden by the mapping's own keys, so duplicates are checked before flattening them in.
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            shown = "a complex key" if key is None and not isinstance(key_node, yaml.ScalarNode) else repr(key)
            raise WorkflowError(f"mapping keys must be strings, got {shown} (quote it)", file=file, line=line,
                                field=dotted(path) or None)
        if key in first_line:
            raise WorkflowError(f"duplicate key {key!r} (first defined on line {first_line[key]})", file=file,
                                line=line, field=dotted((*path, key)))
        first_line[key] = line
    uses_merge_keys = any(key_node.tag == "tag:yaml.org,2002:merge" for key_node, _ in node.value)
    loader.flatten_mapping(node)
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise WorkflowError(f"mapping keys must be strings, got {key!r}", file=file,
                                line=key_node.start_mark.line + 1, field=dotted(path) or None)
        key_path = (*path, key)
        if uses_merge_keys:
            drop_under(locations, key_path)  # a key from `<<` replaced by the mapping's own
        locations[key_path] = Location(file, key_node.start_mark.line + 1)
        mapping[key] = _from_node(loader, value_node, key_path, locations, file, active)
    return mapping


def drop_under(locations: Locations, prefix: KeyPath) -> None:
    n = len(prefix)
    for key in [k for k in locations if k[:n] == prefix]:
        del locations[key]


def deep_merge(base: dict, base_locs: Locations, over: dict, over_locs: Locations, path: KeyPath = ()) -> None:
    """Merge `over` into `base` in place: mappings merge key by key, anything else is replaced."""
    for key, value in over.items():
        key_path = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], base_locs, value, over_locs, key_path)  # the key keeps its first location
        else:
            base[key] = copy.deepcopy(value)
            drop_under(base_locs, key_path)
            n = len(key_path)
            base_locs.update({k: loc for k, loc in over_locs.items() if k[:n] == key_path})


def mark_all(value: Any, path: KeyPath, locations: Locations, location: Location) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        locations[(*path, key)] = location
        mark_all(item, (*path, key), locations, location)
