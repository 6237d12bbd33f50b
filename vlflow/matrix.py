"""Sweeps: a stage's `matrix:` expands it into one stage per combination of values.

    finetune:
      uses: vilt.finetune_retrieval
      inputs: {pretrained: pretrain}
      matrix: {lr: [1e-4, 2e-4], seed: [0, 1]}
      with: {lr: "${matrix.lr}", seed: "${matrix.seed}"}

becomes `finetune@lr=0.0001,seed=0`, `finetune@lr=0.0001,seed=1`, ... (axes in the order written, values as
`KEY=VALUE`; a value that is not a short plain scalar is named by its position, `KEY=0`, `KEY=1`, ...).

A stage that depends on a swept stage (an input, a `needs` entry or `${stages.X.output}`) *follows* it: it expands
over the same values, each entry wired to the matching upstream entry, and may use `${matrix.KEY}` too.
`needs: {X: all}` *gathers* instead: the stage runs once, after every entry of X. Stages upstream of a sweep are not
expanded: they run once and every entry shares their cached artifact.

The expansion rewrites the merged, overridden document before interpolation (so `--set stages.S.matrix.KEY=[...]`
changes a sweep), and every later phase (validation, cache keys, plan, graph, status, selectors) sees plain stages.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from vlflow.errors import WorkflowError
from vlflow.refs import STAGE_OUTPUT_TEXT, stage_ref

MATRIX_KEY = "matrix"
GATHER, FOLLOW = "all", "follow"
AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LABEL = re.compile(r"[A-Za-z0-9_.+-]{1,40}")  # a value shown in a stage name as written
MAX_ENTRIES = 1_000  # stages one matrix may expand into (a typo such as a 1000-value list should not plan for ages)
MAX_EXPANDED_NAME = 200  # expanded names become file names (staging dirs, logs): well under 255 bytes
# `$${` is an escaped literal; `${matrix...}` a matrix reference (anything after `matrix` is checked below)
_MATRIX_TOKEN = re.compile(r"\$\$\{|\$\{\s*matrix\b([^{}]*)\}")
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple  # as written (resolved JSON values)
    labels: tuple[str, ...]  # how each value appears in entry names
    origin: str  # the stage whose `matrix:` declares it


def storage_name(stage: str) -> str:
    """A name for `stage` made of plain path characters (store refs allow letters, digits, '_', '-', '.'):
    the name itself when it is plain, else its base and a digest of the whole (`finetune.3f2a...`)."""
    if _SAFE_PART.fullmatch(stage):
        return stage
    base = stage.partition("@")[0]
    return f"{base}.{hashlib.sha256(stage.encode()).hexdigest()[:16]}"


def base_name(stage: str) -> str:
    """The declared name of a stage or of one entry of its sweep."""
    return stage.partition("@")[0]


def expand_selection(names, known) -> list[str]:
    """Selector names (`--only`, `--until`, `--force`) with a swept stage's declared name standing for all its
    entries; an unknown name is kept (the caller reports it)."""
    known = list(known)
    out: list[str] = []
    for name in names:
        if name in known or "@" in name:
            out.append(name)
            continue
        entries = [k for k in known if k.startswith(name + "@")]
        out.extend(entries or [name])
    return out


def plain_ids(names) -> dict[str, str]:
    """name -> an identifier of letters, digits, '_' and '-' (graph formats such as mermaid need one): the name
    itself when it is one, else its base and its position (`finetune_2`), never one already taken."""
    names = list(names)
    taken = set(names)
    ids = {}
    for index, name in enumerate(names):
        if re.fullmatch(r"[A-Za-z0-9_-]+", name):
            ids[name] = name
            continue
        candidate, n = f"{base_name(name)}_{index}", index
        while candidate in taken:
            n += len(names)
            candidate = f"{base_name(name)}_{n}"
        taken.add(candidate)
        ids[name] = candidate
    return ids


def _label(value: Any) -> str | None:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    return text if LABEL.fullmatch(text) else None


def _escape(value: Any) -> Any:
    """A resolved value put back into the raw document: a literal `${` must stay literal when it is resolved again."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


class _Expansion:
    """One pass over the raw stages. `loader` gives `fail`/`where`/`locations`; `resolver` resolves `${params...}`
    and `${env...}` exactly as the loader does later."""

    def __init__(self, loader, resolver, raw_stages: dict):
        self.loader = loader
        self.resolver = resolver
        self.raw = raw_stages
        self.order = list(raw_stages)
        self.own: dict[str, list[Axis]] = {}
        self.deps: dict[str, list[tuple[str, str, tuple]]] = {}  # stage -> [(dep, mode, where)]
        self.inputs: dict[str, dict] = {}  # resolved `inputs` mappings (strings only)
        self.needs: dict[str, list[tuple[str, str, tuple]] | None] = {}  # resolved needs, None: leave as written
        self.axes: dict[str, list[Axis]] = {}
        self.entries: dict[str, list[tuple[str, dict[str, int]]]] = {}  # stage -> [(entry name, axis -> index)]

    def fail(self, message: str, path: tuple) -> WorkflowError:
        return self.loader.fail(message, path)

    # -- reading ---------------------------------------------------------------------------------------------------

    def read_matrix(self, name: str, raw: dict) -> list[Axis]:
        path = ("stages", name, MATRIX_KEY)
        value = self.resolver.resolve(raw[MATRIX_KEY], path, allow_stages=False)
        if not isinstance(value, dict) or not value:
            raise self.fail("expected a mapping of KEY -> list of values, e.g. matrix: {lr: [0.0001, 0.0002]}",
                            path)
        axes = []
        for key, values in value.items():
            item = (*path, key)
            if not AXIS_NAME.fullmatch(key):
                raise self.fail(f"invalid matrix key {key!r} (letters, digits and '_', not starting with a digit)",
                                item)
            if not isinstance(values, list):
                raise self.fail(f"expected a list of values for matrix key {key!r}, got "
                                f"{type(values).__name__} {values!r}"[:200], item)
            if not values:
                raise self.fail(f"matrix key {key!r} has an empty list: the stage would never run (give at least "
                                "one value, or remove the key)", item)
            labels = [_label(v) for v in values]
            if any(label is None for label in labels):  # named by position, for every value of the axis alike
                labels = [str(index) for index in range(len(values))]
            seen: dict[str, int] = {}
            for index, label in enumerate(labels):
                if label in seen:
                    raise self.fail(f"matrix key {key!r}: values {seen[label] + 1} and {index + 1} both name the "
                                    f"entry {name}@{key}={label} (each value must appear once)", (*item, index))
                seen[label] = index
            axes.append(Axis(key, tuple(values), tuple(labels), name))
        entries = 1
        for axis in axes:
            entries *= len(axis.values)
        if entries > MAX_ENTRIES:
            raise self.fail(f"the matrix expands into {entries:,} stages (at most {MAX_ENTRIES:,})", path)
        return axes

    def check_no_matrix_refs(self, value: Any, path: tuple, where: str) -> None:
        for text, at in _strings(value, path):
            if any(m.group(0) != "$${" for m in _MATRIX_TOKEN.finditer(text)):
                raise self.fail(f"${{matrix.KEY}} is not allowed in `{where}` (only in `with` and `launch`; to sweep "
                                "over upstream stages, sweep them and follow, or name entries such as "
                                "STAGE@KEY=VALUE)", at)

    def read_deps(self, name: str, raw: dict) -> None:
        deps: list[tuple[str, str, tuple]] = []
        raw_inputs = raw.get("inputs")
        resolved_inputs = {}
        if isinstance(raw_inputs, dict):
            self.check_no_matrix_refs(raw_inputs, ("stages", name, "inputs"), "inputs")
            for key, value in raw_inputs.items():
                at = ("stages", name, "inputs", key)
                value = self.resolver.resolve(value, at, allow_stages=False)
                if isinstance(value, str):
                    resolved_inputs[key] = value
                    deps.append((value.strip().partition("/")[0], FOLLOW, at))
        self.inputs[name] = resolved_inputs
        needs = raw.get("needs")
        needs_path = ("stages", name, "needs")
        self.check_no_matrix_refs(needs, needs_path, "needs")
        resolved_needs: list | None = None
        if isinstance(needs, dict):
            resolved_needs = []
            for key, mode in needs.items():
                at = (*needs_path, key)
                mode = self.resolver.resolve(mode, at, allow_stages=False)
                if mode not in (GATHER, FOLLOW):
                    raise self.fail(f"expected `all` (run once, after every entry of {key}'s sweep) or `follow` "
                                    f"(one entry per entry of {key}), got {mode!r}", at)
                resolved_needs.append((key, mode, at))
        elif isinstance(needs, (str, list)):
            value = self.resolver.resolve(needs, needs_path, allow_stages=False)
            items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
            if items is not None and all(isinstance(item, str) for item in items):
                resolved_needs = [(item, FOLLOW, (*needs_path, index)) for index, item in enumerate(items)]
        self.needs[name] = resolved_needs
        deps.extend(resolved_needs or [])
        for text, at in _strings(raw.get("with"), ("stages", name, "with")):
            deps.extend((stage, FOLLOW, at) for stage in STAGE_OUTPUT_TEXT.findall(text))
        self.deps[name] = [(dep, mode, at) for dep, mode, at in deps if dep in self.raw and dep != name]

    # -- planning the expansion ----------------------------------------------------------------------------------

    def topological(self) -> list[str]:
        """Stages in dependency order; a cycle is reported as the loader's graph check would."""
        state: dict[str, int] = {}
        out: list[str] = []

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = trail[trail.index(name):]
                start = min(range(len(cycle)), key=lambda i: self.order.index(cycle[i]))
                cycle = cycle[start:] + cycle[:start]
                raise self.fail("dependency cycle: " + " -> ".join([*cycle, cycle[0]]), ("stages", cycle[0]))
            state[name] = 1
            for dep, _, _ in self.deps.get(name, []):
                visit(dep, [*trail, name])
            state[name] = 2
            out.append(name)

        for name in self.order:
            visit(name, [])
        return out

    def plan_axes(self, name: str) -> list[Axis]:
        axes: list[Axis] = []
        gathered = {dep for dep, mode, _ in self.deps[name] if mode == GATHER}
        for dep, mode, at in self.deps[name]:
            if mode != FOLLOW:
                continue
            if dep in gathered and self.axes[dep]:
                raise self.fail(f"stage {name!r} gathers {dep!r} (needs: {{{dep}: all}}) and also uses it as one "
                                f"artifact here; name one entry instead, e.g. {self.entries[dep][0][0]}", at)
            for axis in self.axes[dep]:
                same = next((a for a in axes if a.name == axis.name), None)
                if same is None:
                    axes.append(axis)
                elif same.origin != axis.origin:
                    raise self.fail(f"stage {name!r} follows two sweeps over {axis.name!r} (from {same.origin!r} "
                                    f"and {axis.origin!r}); rename one matrix key, or gather one of them "
                                    f"(needs: {{{axis.origin}: all}})", at)
        for axis in self.own.get(name, []):
            inherited = next((a for a in axes if a.name == axis.name), None)
            if inherited is not None:
                raise self.fail(f"matrix key {axis.name!r} is already swept by upstream stage {inherited.origin!r}, "
                                f"which {name!r} follows (each entry uses the matching {inherited.origin} entry); "
                                "use another key name", ("stages", name, MATRIX_KEY, axis.name))
            axes.append(axis)
        return axes

    def plan_entries(self, name: str) -> list[tuple[str, dict[str, int]]]:
        axes = self.axes[name]
        if not axes:
            return [(name, {})]
        entries = []
        for combination in itertools.product(*(range(len(a.values)) for a in axes)):
            label = ",".join(f"{a.name}={a.labels[i]}" for a, i in zip(axes, combination))
            entry = f"{name}@{label}"
            if len(entry) > MAX_EXPANDED_NAME:
                raise self.fail(f"the sweep entry name {entry[:60]}... is longer than {MAX_EXPANDED_NAME} characters "
                                "(shorten the matrix keys or values)", ("stages", name, MATRIX_KEY))
            entries.append((entry, {a.name: i for a, i in zip(axes, combination)}))
        if len(entries) > MAX_ENTRIES:
            raise self.fail(f"the stage expands into {len(entries):,} entries with the sweeps it follows (at most "
                            f"{MAX_ENTRIES:,})", ("stages", name))
        return entries

    def entry_of(self, dep: str, choice: dict[str, int]) -> str:
        """The entry of `dep` matching the axis values `choice` of a stage that follows it."""
        if not self.axes[dep]:
            return dep
        wanted = {a.name: choice[a.name] for a in self.axes[dep]}
        for entry, indices in self.entries[dep]:
            if indices == wanted:
                return entry
        raise AssertionError(f"no entry of {dep} for {wanted}")  # plan_axes guarantees one

    # -- writing -------------------------------------------------------------------------------------------------

    def substitute(self, value: Any, path: tuple, values: dict[str, Any], stage: str) -> Any:
        if isinstance(value, dict):
            return {k: self.substitute(v, (*path, k), values, stage) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, (*path, i), values, stage) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        matches = [m for m in _MATRIX_TOKEN.finditer(value)]
        if all(m.group(0) == "$${" for m in matches):
            return value
        pieces, position = [], 0
        for match in matches:
            pieces.append(value[position:match.start()])
            position = match.end()
            if match.group(0) == "$${":
                pieces.append("$${")
                continue
            rest = match.group(1).strip()
            key = rest[1:] if rest.startswith(".") else None
            if key is None or not AXIS_NAME.fullmatch(key):
                raise self.fail(f"malformed reference {match.group(0)} (expected ${{matrix.KEY}})", path)
            if key not in values:
                known = ", ".join(values)
                raise self.fail(f"unknown matrix key {key!r} in {match.group(0)} (" + (
                    f"stage {stage!r} sweeps over: {known})" if known else
                    f"stage {stage!r} has no `matrix:` and follows no sweep)"), path)
            if len(matches) == 1 and match.span() == (0, len(value)):
                return _escape(copy.deepcopy(values[key]))  # the whole value: keep its type
            if isinstance(values[key], (dict, list)):
                raise self.fail(f"{match.group(0)} is a {type(values[key]).__name__}; it cannot be inserted into "
                                "text (use it as the whole value)", path)
            pieces.append(_as_text(values[key]).replace("${", "$${"))
        pieces.append(value[position:])
        return "".join(pieces)

    def rewrite_outputs(self, value: Any, path: tuple, name: str, choice: dict[str, int], gathered: set[str]
                        ) -> Any:
        if isinstance(value, dict):
            return {k: self.rewrite_outputs(v, (*path, k), name, choice, gathered) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rewrite_outputs(v, (*path, i), name, choice, gathered) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def replace(match: re.Match) -> str:
            dep = match.group(1)
            if dep not in self.raw or not self.axes[dep]:
                return match.group(0)
            if dep in gathered:
                raise self.fail(f"stage {name!r} gathers {dep!r} (needs: {{{dep}: all}}), so ${{stages.{dep}.output}} "
                                f"names no one artifact; name one entry, e.g. ${{stages.{self.entries[dep][0][0]}"
                                ".output}", path)
            return stage_ref(self.entry_of(dep, choice))

        return STAGE_OUTPUT_TEXT.sub(replace, value)

    def write(self, name: str, entry: str, choice: dict[str, int]) -> dict:
        raw = self.raw[name]
        out = {k: copy.deepcopy(v) for k, v in raw.items() if k != MATRIX_KEY}
        values = {a.name: a.values[choice[a.name]] for a in self.axes[name]}
        gathered = {dep for dep, mode, _ in self.deps[name] if mode == GATHER}
        for key in list(out):
            if key in ("with", "launch"):
                out[key] = self.substitute(out[key], ("stages", name, key), values, name)
            elif key not in ("inputs", "needs"):
                self.check_no_matrix_refs(out[key], ("stages", name, key), key)
        if "with" in out:
            out["with"] = self.rewrite_outputs(out["with"], ("stages", name, "with"), name, choice, gathered)
        if self.inputs.get(name):
            for key, value in self.inputs[name].items():
                stage, slash, sub = value.strip().partition("/")
                if stage in self.raw and self.axes[stage]:
                    value = self.entry_of(stage, choice) + slash + sub
                out["inputs"][key] = _escape(value)
        if self.needs.get(name) is not None:
            needs = []
            for dep, mode, _ in self.needs[name]:
                if dep not in self.raw:
                    needs.append(dep)  # the loader reports it
                elif mode == GATHER:
                    needs.extend(entry for entry, _ in self.entries[dep])
                else:
                    needs.append(self.entry_of(dep, choice))
            out["needs"] = [_escape(n) for n in dict.fromkeys(needs)]
        return out

    def run(self) -> dict:
        for name, raw in self.raw.items():
            if isinstance(raw, dict):
                if MATRIX_KEY in raw:
                    self.own[name] = self.read_matrix(name, raw)
                self.read_deps(name, raw)
            else:
                self.deps[name] = []
        for name in self.topological():
            self.axes[name] = self.plan_axes(name)
            self.entries[name] = self.plan_entries(name)
        expanded: dict = {}
        locations = self.loader.locations
        for name, raw in self.raw.items():
            if not isinstance(raw, dict):
                expanded[name] = raw
                continue
            prefix = ("stages", name)
            own_locations = [(k, loc) for k, loc in locations.items() if k[:2] == prefix]
            for entry, choice in self.entries[name]:
                if entry != name and entry in self.raw:
                    raise self.fail(f"the sweep of {name!r} makes an entry named {entry!r}, which is also a declared "
                                    "stage (rename one)", ("stages", name, MATRIX_KEY))
                expanded[entry] = self.write(name, entry, choice)
                if entry != name:
                    for key, loc in own_locations:
                        locations[("stages", entry, *key[2:])] = loc
        return expanded


def _strings(value: Any, path: tuple):
    """(text, path) of every string in a raw value."""
    if isinstance(value, str):
        yield value, path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))


def uses_sweeps(raw_stages: dict) -> bool:
    """Whether anything in the stages needs the expansion (a `matrix:`, a `needs:` mapping, a `${matrix...}`)."""
    for raw in raw_stages.values():
        if isinstance(raw, dict) and (MATRIX_KEY in raw or isinstance(raw.get("needs"), dict)):
            return True
    return any(m.group(0) != "$${" for m in _MATRIX_TOKEN.finditer(json.dumps(raw_stages, default=str)))


def expand_matrices(loader, resolver, raw_stages: dict) -> dict:
    """The raw stages with every sweep expanded into its entries (in file order, each entry where its stage was).
    `loader.locations` gains the entries' locations (those of the stage they come from)."""
    if not uses_sweeps(raw_stages):
        return raw_stages
    return _Expansion(loader, resolver, raw_stages).run()
