"""One source of configuration: params.yaml holds every value, dfnet/params.py types and checks
it (no second set of defaults), recipes are overlays on it, and dvc.yaml declares what each stage
reads."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from dfnet.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _on_disk() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_params_yaml_is_the_only_place_a_value_is_written():
    """No dataclass field has a default, and params.yaml parses completely: every section and
    key it has is a field and every field has its value there, unchanged."""
    sections = typing.get_type_hints(Params)
    for cls in (Params, *sections.values()):
        defaults = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING]  # fmt: skip
        assert not defaults, f"{cls.__name__} has defaults for {defaults}: params.yaml is their place"
    assert load_params(REPO / "params.yaml").to_dict() == _on_disk()


def test_a_missing_or_unknown_key_is_an_error_naming_it():
    raw = _on_disk()
    del raw["train"]["epochs"], raw["loss"]["tv"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['loss.tv'\]"):
        parse_params(raw)
    raw["loss"]["tv"] = 0.1
    with pytest.raises(ValueError, match=r"missing key\(s\) \['train.epochs'\]"):
        parse_params(raw)
    with pytest.raises(ValueError, match="section 'mlflow' is missing"):
        parse_params({k: v for k, v in _on_disk().items() if k != "mlflow"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\] in section 'train'"):
        load_params(REPO / "params.yaml", {"train": {"epoch": 3}})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trian'\]"):
        load_params(REPO / "params.yaml", {"trian": {"epochs": 3}})


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_are_overlays_of_the_keys_they_change(recipe: Path):
    """A recipe writes only what differs from params.yaml; the rest is params.yaml's, and
    overrides (a command line's flags) go over the recipe."""
    overlay, on_disk = yaml.safe_load(recipe.read_text()), _on_disk()
    same = [f"{s}.{k}" for s, values in overlay.items() for k, v in values.items() if on_disk[s][k] == v]
    assert not same, f"{recipe.name} repeats params.yaml's {same}"
    params = load_params(REPO / "params.yaml", recipe=recipe).to_dict()
    assert params == {s: on_disk[s] | overlay.get(s, {}) for s in on_disk}
    section, key = next((s, k) for s, values in overlay.items() for k in values)
    over = load_params(REPO / "params.yaml", {section: {key: on_disk[section][key]}}, recipe=recipe)
    assert getattr(getattr(over, section), key) == on_disk[section][key]


def test_the_shipped_models_recipe_trains_from_scratch():
    """params.yaml fine-tunes the shipped model; its recipe must not start from itself."""
    assert load_params(REPO / "params.yaml").train.init_from == "pretrained"
    assert load_params(REPO / "params.yaml", recipe=REPO / "recipes" / "pretrained.yaml").train.init_from is None


# --- dvc.yaml declares what each stage reads ------------------------------------------------
# Code: the repository's Python files a stage imports (walked from `pipelines.<stage>`, lazy
# imports inside functions included). Parameters: the params.yaml sections and keys the code
# reachable from the stage's `main` reads off a `params` object (`params.data.out_dir`, an alias
# `ev = params.evaluate` then `ev.sizes`, or a whole section handed on: `prepare(params.data)`).
# Data files (the photos, the shipped model) are declared by hand and not checked here.

#: {section: its keys}, from the dataclasses.
SECTIONS = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in typing.get_type_hints(Params).items()}


def _module_file(module: str) -> Path | None:
    """The repository file of a dotted module name, or None when it is not one of ours."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and ".venv" not in candidate.parts:
            return candidate
    return None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(p for p in (package if node.level else "", node.module or "") if p)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return {".".join(name.split(".")[: i + 1]) for name in found for i in range(name.count(".") + 1)}


def import_closure(module: str) -> dict[str, Path]:
    """{module: file} of every repository module that importing `module` loads."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        tree = ast.parse(path.read_text())
        todo.extend(_imported_modules(tree, name, path.name == "__init__.py"))
    return seen


def _section_reads(function: ast.AST) -> tuple[set[str], list[ast.Name]]:
    """Parameters read in `function` ("section" or "section.key"), and the names it references."""
    aliases: dict[str, str] = {}
    aliased: set[ast.AST] = set()  # the `params.evaluate` of an alias: read through the alias
    for node in ast.walk(function):  # `ev = params.evaluate`, `t, ev = params.train, params.evaluate`
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            targets, values = node.targets[0], node.value
            both_tuples = isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple)
            for target, value in zip(targets.elts, values.elts) if both_tuples else [(targets, values)]:
                if isinstance(target, ast.Name) and (section := _section_of(value)):
                    aliases[target.id] = section
                    aliased.add(value)
    reads: set[str] = set()
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(function):
        section = _section_of(node) or (aliases.get(node.id) if isinstance(node, ast.Name) else None)
        if not section or node in aliased or isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr in SECTIONS[section]:
            reads.add(f"{section}.{parent.attr}")
        else:  # the section handed on whole, or a method of it called
            reads.add(section)
    names = [n for n in ast.walk(function) if isinstance(n, ast.Name | ast.Attribute)]
    return reads, names  # type: ignore[return-value]


def _section_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
        return node.attr if node.attr in SECTIONS else None
    return None


def params_read(module: str) -> set[str]:
    """The parameters read by the code reachable from `module.main`, following references to
    functions and classes of repository modules (through `from x import f` and `x.f`)."""
    modules = import_closure(module)
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    definitions = {
        (name, node.name): node
        for name, tree in trees.items()
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
    }
    imported: dict[str, dict[str, tuple[str, str | None]]] = {}  # module -> local name -> (module, name)
    for name, tree in trees.items():
        table = imported.setdefault(name, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    table[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    table[alias.asname or alias.name] = (alias.name, None)
    reads: set[str] = set()
    todo, done = [(module, "main")], set()
    while todo:
        key = todo.pop()
        if key in done or key not in definitions:
            continue
        done.add(key)
        found, names = _section_reads(definitions[key])
        reads |= found
        owner = key[0]
        for node in names:
            if isinstance(node, ast.Name):
                target = imported[owner].get(node.id, (owner, node.id))
                if target[1] is None:
                    continue
                todo.append((target[0], target[1]))
                if target[0] in trees and f"{target[0]}.{target[1]}" in trees:
                    todo.append((f"{target[0]}.{target[1]}", "main"))
            elif isinstance(node.value, ast.Name) and imported[owner].get(node.value.id, ("", ""))[1] is None:
                todo.append((imported[owner][node.value.id][0], node.attr))  # `registry.register_model`
            elif isinstance(node.value, ast.Name) and node.value.id in imported[owner]:
                source = imported[owner][node.value.id]  # `from tracking import registry`
                todo.append((f"{source[0]}.{source[1]}", node.attr))
    return reads


def _declared(stage: dict) -> tuple[list[str], set[str]]:
    params: set[str] = set()
    for entry in stage.get("params", []):
        params.update([entry] if isinstance(entry, str) else entry)
    return [str(d) for d in stage.get("deps", [])], params


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(_stages()))
def test_dvc_stage_declares_the_code_it_imports(stage: str):
    spec = _stages()[stage]
    module = spec["cmd"].split("-m ", 1)[1].split()[0]
    files = {path.relative_to(REPO).as_posix() for path in import_closure(module).values()}
    deps, _ = _declared(spec)
    missing = sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"stage {stage} imports {missing} but dvc.yaml does not declare them"
    code = [d for d in deps if d.endswith(".py") or (REPO / d / "__init__.py").is_file()]
    stale = sorted(d for d in code if not any(f == d or f.startswith(d + "/") for f in files))
    assert not stale, f"stage {stage} declares {stale} but does not import them"


@pytest.mark.parametrize("stage", list(_stages()))
def test_dvc_stage_declares_the_params_it_reads(stage: str):
    spec = _stages()[stage]
    module = spec["cmd"].split("-m ", 1)[1].split()[0]
    reads = params_read(module)
    _, declared = _declared(spec)
    missing = sorted(r for r in reads if r not in declared and r.split(".")[0] not in declared)
    assert not missing, f"stage {stage} reads {missing} but dvc.yaml does not declare them"
    stale = sorted(d for d in declared if not any(r in (d, d.split(".")[0]) or r.startswith(d + ".") for r in reads))
    assert not stale, f"stage {stage} declares {stale} but does not read them"


def test_params_sit_at_the_bottom_so_a_model_edit_reruns_only_its_stages():
    """dfnet/params.py imports no other repository module, so only the stages that build or load
    a model (train, evaluate, register) depend on dfnet/model.py, and only train on the losses."""
    assert set(import_closure("dfnet.params")) == {"dfnet.params"}
    stages = _stages()
    for module, expected in {"dfnet/model.py": {"train", "evaluate", "register"}, "dfnet/losses.py": {"train"}}.items():
        dependent = {name for name, spec in stages.items() if any(
            module == d or module.startswith(d.rstrip("/") + "/") for d in _declared(spec)[0])}  # fmt: skip
        assert dependent == expected, module
