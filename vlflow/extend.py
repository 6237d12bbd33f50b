"""Replacing and deleting stages of the files a workflow extends or includes.

By default a file's stage is deep-merged into the same stage of its bases (`with` key by key). Two stage keys change
that, for the stage as a whole:

    extends: tiny_vilt.yaml
    stages:
      data:                 # a different stage under the same name: nothing of the base's `data` is kept
        replace: true
        uses: synthetic.coco
        with: {num_images: 100}
      finetune_vqa: {delete: true}
      evaluate_vqa: {delete: true}

(docker-compose spells these `!override` and `!reset`; workflows refuse custom YAML tags, so here they are keys that
are checked like any other.) Replacing or deleting a stage that no base defines is an error, and so is deleting a
stage that a remaining stage still uses (an input, `needs` or `${stages.X.output}`), naming the user's line.
"""
from __future__ import annotations

from typing import Any

from vlflow.errors import WorkflowError
from vlflow.refs import STAGE_OUTPUT_TEXT

REPLACE, DELETE = "replace", "delete"


def _where(locations: dict, path: tuple):
    """The location of `path`, or of its nearest located parent (None when unknown)."""
    while path and path not in locations:
        path = path[:-1]
    return locations.get(path)


def _line(locations: dict, path: tuple) -> int | None:
    location = _where(locations, path)
    return None if location is None else location.line


def _references(raw: Any, target: str) -> list[tuple]:
    """Key paths (inside one raw stage) where it uses stage `target`."""
    found = []
    if not isinstance(raw, dict):
        return found
    inputs = raw.get("inputs")
    if isinstance(inputs, dict):
        found += [("inputs", key) for key, value in inputs.items()
                  if isinstance(value, str) and value.strip().partition("/")[0] == target]
    needs = raw.get("needs")
    if isinstance(needs, str) and needs == target:
        found.append(("needs",))
    elif isinstance(needs, list):
        found += [("needs", index) for index, item in enumerate(needs) if item == target]
    elif isinstance(needs, dict) and target in needs:
        found.append(("needs", target))

    def walk(value: Any, path: tuple) -> None:
        if isinstance(value, str):
            if target in STAGE_OUTPUT_TEXT.findall(value):
                found.append(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, index))

    walk(raw.get("with"), ("with",))
    return found


def merge_own_file(base: dict, base_locs: dict, own: dict, own_locs: dict, file: str) -> None:
    """Merge one file's own document `own` over what its bases gave (`base`, in place), honouring `replace: true`
    and `delete: true` on its stages."""
    from vlflow.workflow.yaml_lines import deep_merge as _deep_merge
    from vlflow.workflow.yaml_lines import drop_under as _drop_under

    stages = own.get("stages")
    base_stages = base.get("stages") if isinstance(base.get("stages"), dict) else {}
    deleted: dict[str, int | None] = {}  # name -> line of its `delete: true`
    if isinstance(stages, dict):
        for name, raw in list(stages.items()):
            if not isinstance(raw, dict) or not ({REPLACE, DELETE} & set(raw)):
                continue
            path = ("stages", name)
            for key in (REPLACE, DELETE):
                if key in raw and not isinstance(raw[key], bool):
                    raise WorkflowError(f"expected true or false, got {raw[key]!r}"[:200], file=file,
                                        line=_line(own_locs, (*path, key)), field=f"stages.{name}.{key}")
            if raw.get(REPLACE) and raw.get(DELETE):
                raise WorkflowError("a stage is either replaced or deleted, not both", file=file,
                                    line=_line(own_locs, (*path, DELETE)), field=f"stages.{name}")
            action = REPLACE if raw.get(REPLACE) else DELETE if raw.get(DELETE) else None
            if action is not None and name not in base_stages:
                known = ", ".join(base_stages) or "none"
                hint = " (remove `replace: true` to add a new stage)" if action == REPLACE else ""
                raise WorkflowError(f"cannot {action} stage {name!r}: no file this one extends or includes defines "
                                    f"it (their stages: {known}){hint}", file=file,
                                    line=_line(own_locs, (*path, action)), field=f"stages.{name}.{action}")
            if action == DELETE:
                others = [key for key in raw if key != DELETE]
                if others:
                    raise WorkflowError(f"`delete: true` stands alone (this stage also sets {others[0]!r}); to "
                                        "define the stage anew use `replace: true`", file=file,
                                        line=_line(own_locs, (*path, others[0])), field=f"stages.{name}.{others[0]}")
                deleted[name] = _line(own_locs, (*path, DELETE))
                del stages[name]
                _drop_under(own_locs, path)
            for key in (REPLACE, DELETE):  # `replace: false` is the default merge; the keys themselves go
                raw.pop(key, None)
                own_locs.pop((*path, key), None)
            if action is not None:
                del base_stages[name]
                _drop_under(base_locs, path)
    _deep_merge(base, base_locs, own, own_locs)
    merged = base.get("stages") if isinstance(base.get("stages"), dict) else {}
    for name, line in deleted.items():
        for user, raw in merged.items():
            uses = _references(raw, name)
            if uses:
                where = ("stages", user, *uses[0])
                location = _where(base_locs, where)
                raise WorkflowError(f"stage {user!r} uses stage {name!r}, which {file}:{line} deletes; delete or "
                                    f"replace {user!r} too, or point it at another stage",
                                    file=location.file if location is not None else file,
                                    line=location.line if location is not None else None,
                                    field=".".join(str(p) for p in where))
