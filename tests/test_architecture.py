"""The package's shape: a core that runs without Ray, Ray only in dist/, no import
cycles, short functions, and CLI flag tables that cannot drift from the parser."""
import ast
import dataclasses
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "scdd_ray")
# Modules that put the core on Ray, and the front ends above them; everything else must import without Ray.
NEEDS_RAY = {"scdd_ray.dist", "scdd_ray.pipeline.distill", "scdd_ray.pipeline.posttrain", "scdd_ray.bench",
             "scdd_ray.ranking", "scdd_ray.cli", "scdd_ray.__main__"}


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (a package by its own name), parsed."""
    out = {}
    for root, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.join(ROOT, ".."))[:-3].replace(os.sep, ".")
                with open(os.path.join(root, f)) as fh:
                    out[rel.removesuffix(".__init__")] = ast.parse(fh.read())
    return out


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules `name` imports anywhere in its body (inside functions too)."""
    is_package = any(k.startswith(name + ".") for k in known)
    package = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def is_ray_free(name: str) -> bool:
    return not any(name == m or name.startswith(m + ".") for m in NEEDS_RAY)


def test_core_imports_without_ray():
    free = sorted(m for m in modules() if is_ray_free(m))
    assert "scdd_ray.core.training" in free and "scdd_ray.data.digits" in free
    code = ("import sys\n"
            "class NoRay:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ImportError('ray is not installed here')\n"
            "sys.meta_path.insert(0, NoRay())\n"
            "import importlib\n"
            f"for m in {free!r}:\n"
            "    importlib.import_module(m)\n"
            "try:\n"
            "    import ray\n"
            "except ImportError:\n"
            "    print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.join(ROOT, ".."))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_only_dist_imports_ray():
    for name, tree in modules().items():
        uses = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        uses |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert "ray" not in uses or name.startswith("scdd_ray.dist"), f"{name} imports ray"


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(m, t, set(mods)) for m, t in mods.items()}
    # A package's __init__ importing its own submodules (registration) is not a cycle of the layering.
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert graph["scdd_ray.core.training"] and "scdd_ray.dist.train" not in graph["scdd_ray.core.training"]


def test_no_function_longer_than_80_lines():
    long = [f"{m}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for m, t in modules().items()
            for n in ast.walk(t) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def _config_fields() -> set[str]:
    from scdd_ray.config import DistillConfig

    out = set()
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("squeeze", "recover", "posttrain"):
            out |= {f"{f.name}.{g.name}" for g in dataclasses.fields(getattr(DistillConfig(dataset="x", out="y"),
                                                                            f.name))}
        else:
            out.add(f.name)
    return out


def test_every_field_the_cli_maps_is_a_flag_of_its_command():
    from scdd_ray.cli import COMMANDS, build_parser, flag_namer

    _, parsers = build_parser()
    assert set(parsers) == set(COMMANDS)
    for name, cmd in COMMANDS.items():
        dests = {a.dest for a in parsers[name]._actions if a.option_strings}
        missing = sorted(d for d in cmd.fields.values() if d not in dests)
        assert not missing, f"{name}: no flag for {missing}"
        namer = flag_namer(parsers[name], cmd.fields)
        assert all(namer(f).startswith("--") for f in cmd.fields)
    # distill's config fields are real DistillConfig fields, and a stage field gets its own flag.
    known = _config_fields()
    assert set(COMMANDS["distill"].fields) <= known
    distill = flag_namer(parsers["distill"], COMMANDS["distill"].fields)
    posttrain = flag_namer(parsers["posttrain"], COMMANDS["posttrain"].fields)
    assert distill("posttrain.epochs") == "--posttrain-epochs" and posttrain("posttrain.epochs") == "--epochs"
    assert distill("recover.crop_scale") == "--recover-crop-scale" and distill("squeeze.method") == "--ssl"
    assert distill("squeeze.weight_decay") is None  # no flag sets it: errors show the field itself


def test_library_errors_name_fields_not_flags():
    from scdd_ray.config import build_distill_config
    from scdd_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_distill_config("digits", "out", {"recover.iterations": 0})
    assert e.value.field == "recover.iterations" and "--" not in str(e.value)
    assert e.value.render({"recover.iterations": "--iterations"}.get).startswith("--iterations: ")
