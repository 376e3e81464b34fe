"""The package's shape: a core that runs without Ray, Ray only in dist/, no import
cycles, short functions, and CLI flag tables that cannot drift from the parser."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "scdd_ray")
# Modules that put the core on Ray, and the front ends above them; everything else must import without Ray.
NEEDS_RAY = {"scdd_ray.dist", "scdd_ray.pipeline.distill", "scdd_ray.pipeline.posttrain", "scdd_ray.bench",
             "scdd_ray.cli", "scdd_ray.__main__"}


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
    assert "scdd_ray.core.posttrain" in free and "scdd_ray.data.digits" in free
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
    assert graph["scdd_ray.core.posttrain"] and "scdd_ray.dist.posttrain" not in graph["scdd_ray.core.posttrain"]


def test_no_function_longer_than_80_lines():
    long = [f"{m}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for m, t in modules().items()
            for n in ast.walk(t) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_library_errors_name_fields_not_flags():
    from scdd_ray.config import build_distill_config
    from scdd_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_distill_config("digits", "out", {"recover.iterations": 0})
    assert e.value.field == "recover.iterations" and "--" not in str(e.value)
    assert e.value.render({"recover.iterations": "--iterations"}.get).startswith("--iterations: ")


# --- one recipe: every numeric default in the schema or a preset file -------------------------------

REPO = os.path.join(ROOT, "..")
# Where a run's settings are decided for the user: none may hold a numeric default of its own.
FRONT_ENDS = ("scdd_ray/cli.py", "scdd_ray/tune_config.py", "scdd_ray/dist/tune.py", "scdd_ray/bench",
              "scdd_ray/pipeline", "benchmarks")
PLACEMENT = {"num_gpus", "num_workers", "posttrain_workers"}  # where a run runs, not what it computes
SECTIONS = ("squeeze", "recover", "posttrain")


def _number(node) -> bool:
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def hyperparameter_literals(tree: ast.Module, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every number bound to a name of the recipe's settings: a keyword argument, a dict
    entry, a parameter default, an argparse default."""
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.keyword) and n.arg in names and _number(n.value):
            hits.append((n.lineno, n.arg))
        elif isinstance(n, ast.Dict):
            hits += [(n.lineno, k.value) for k, v in zip(n.keys, n.values)
                     if isinstance(k, ast.Constant) and k.value in names and _number(v)]
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = n.args.posonlyargs + n.args.args
            pairs = list(zip(args[len(args) - len(n.args.defaults):], n.args.defaults))
            pairs += [(a, d) for a, d in zip(n.args.kwonlyargs, n.args.kw_defaults) if d is not None]
            hits += [(n.lineno, a.arg) for a, d in pairs if a.arg in names and _number(d)]
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument":
            flag = next((c.value for c in n.args if isinstance(c, ast.Constant)), "").lstrip("-").replace("-", "_")
            section, _, name = flag.partition("_")
            if (flag in names or (section in SECTIONS and name in names)) and any(
                    k.arg == "default" and _number(k.value) for k in n.keywords):
                hits.append((n.lineno, flag))
    return hits


def test_no_numeric_hyperparameter_default_outside_the_schema_and_presets():
    from scdd_ray.config import recipe_fields

    names = {k.rpartition(".")[2] for k in recipe_fields()} - PLACEMENT
    found = []
    for place in FRONT_ENDS:
        path = os.path.join(REPO, place)
        files = [path] if path.endswith(".py") else [os.path.join(path, f) for f in sorted(os.listdir(path))
                                                     if f.endswith(".py")]
        for f in files:
            with open(f) as fh:
                found += [f"{os.path.relpath(f, REPO)}:{line} {name}" for line, name in
                          hyperparameter_literals(ast.parse(fh.read()), names)]
    assert not found, found
    # the check itself sees what it must refuse
    bad = ast.parse("f(lr=0.1)\nd = {'bn_coef': 1}\ndef g(epochs=3): pass\np.add_argument('--jitter', default=4)\n"
                    "p.add_argument('--posttrain-epochs', default=9)\np.add_argument('--timed-iterations', default=9)")
    assert sorted(n for _, n in hyperparameter_literals(bad, names)) == ["bn_coef", "epochs", "jitter", "lr",
                                                                          "posttrain_epochs"]
