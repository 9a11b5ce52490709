"""Import hygiene: the core imports no model library, exports what it says, and installs no generic
top-level package names (``backends``, ``nodes`` live under ``atpframework``)."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

import atpframework

HEAVY = ("transformer_lens", "transformers", "sae_lens")


def run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_and_schema_import_no_model_library(tmp_path):
    out = run_python(
        f"""
        import json, sys
        import atpframework
        after_import = [m for m in {HEAVY!r} if m in sys.modules]
        schema = atpframework.plan_json_schema()
        plan = atpframework.parse_plan({{
            "model": {{"source": "in_memory"}},
            "prompts": [{{"clean": [1, 2], "noise": [1, 3], "answer": 2, "wrong_answer": 3}}],
            "nodes": [{{"kind": "attn_head"}}, {{"kind": "mlp_neuron"}}, {{"kind": "resid"}}],
            "method": {{"name": "atp"}},
        }})
        loaded = sorted(m for m in sys.modules if m.startswith("atpframework.nodes."))
        print(json.dumps(dict(
            after_import=after_import,
            after_schema=[m for m in {HEAVY!r} if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)],
            n_kinds=len(schema["properties"]["nodes"]["items"]["oneOf"]),
            loaded=loaded,
            backend_module="atpframework.backends.transformer_lens" in sys.modules,
        )))
        """,
        cwd=tmp_path,
    )
    assert out["after_import"] == []
    assert out["after_schema"] == []
    assert out["n_kinds"] >= 6
    # the schema and the plan really did import the node plugins, and still nothing heavy
    assert {"atpframework.nodes.attn_head", "atpframework.nodes.mlp_neuron", "atpframework.nodes.resid"} <= set(out["loaded"])
    assert out["backend_module"] is False


@pytest.mark.parametrize("name", atpframework.__all__)
def test_every_public_name_is_importable(name):
    assert hasattr(atpframework, name)
    namespace = {}
    exec(f"from atpframework import {name}", namespace)
    assert namespace[name] is getattr(atpframework, name)


def test_all_has_no_duplicates_and_lists_the_main_api():
    assert len(atpframework.__all__) == len(set(atpframework.__all__))
    for required in ("run", "compile", "parse_plan", "load_plan", "load_result", "plan_json_schema", "PlanError",
                     "SchemaError", "PluginError", "AbstractNode", "AbstractBackend", "NodeSpec", "AttributionPlan"):
        assert required in atpframework.__all__


def test_backends_and_nodes_are_not_top_level_modules(tmp_path):
    out = run_python(
        """
        import importlib, json
        status = {}
        for name in ("backends", "nodes", "atpframework.backends", "atpframework.nodes",
                     "atpframework.nodes.attn_head", "atpframework.backends.transformer_lens"):
            try:
                importlib.import_module(name)
                status[name] = "ok"
            except ModuleNotFoundError as err:
                status[name] = f"missing: {err.name}"
        print(json.dumps(status))
        """,
        cwd=tmp_path,
    )
    assert out["backends"] == "missing: backends"
    assert out["nodes"] == "missing: nodes"
    assert out["atpframework.backends"] == "ok"
    assert out["atpframework.nodes"] == "ok"
    assert out["atpframework.nodes.attn_head"] == "ok"
    assert out["atpframework.backends.transformer_lens"] == "ok"


def test_installed_subpackages_map_to_the_repo_folders():
    import atpframework.backends
    import atpframework.nodes

    repo = os.path.dirname(os.path.dirname(os.path.abspath(atpframework.__file__)))
    assert os.path.dirname(os.path.abspath(atpframework.nodes.__file__)).endswith("nodes")
    assert os.path.dirname(os.path.abspath(atpframework.backends.__file__)).endswith("backends")
    if os.path.isdir(os.path.join(repo, "nodes")):  # an editable install of this checkout
        assert importlib.util.find_spec("atpframework.nodes.attn_head").origin == os.path.join(repo, "nodes", "attn_head.py")


def _runtime_imports(path, module, modules):
    """The package modules ``module`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != module}


def _package_files():
    """Dotted module name -> file, for the core (every folder of atpframework/) and the built-in plugins."""
    from pathlib import Path

    files = {}
    for package in ("atpframework", "atpframework.backends", "atpframework.nodes"):
        folder = Path(importlib.import_module(package).__path__[0])
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "atpframework" and parts[0] in ("backends", "nodes"):
                continue  # a worktree's links to the plugin folders
            dotted = ".".join((package, *parts))
            files[dotted.removesuffix(".__init__")] = path
    return files


def test_the_package_import_graph_has_no_cycle():
    """Every module of atpframework (core, backends, nodes), imports inside functions included: no module
    reaches itself again. A cycle held apart by late imports is how the method layer used to be tied."""
    files = _package_files()
    assert len(files) > 40
    graph = {m: _runtime_imports(p, m, files) for m, p in files.items()}
    assert "atpframework.plans.compiled" in graph["atpframework.engine.runner"]  # the parser sees the imports

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


LAYERS = [
    ("foundations", ["errors", "version", "plugins"]),
    ("io", ["io", "io.files", "io.tables", "io.progress", "io.results"]),
    ("model", ["model", "model.dims", "model.sites", "model.backend", "model.node", "model.interventions", "model.sae", "model.bundled", "model.edges"]),
    ("plans", ["plans", "plans.chunking", "plans.plan", "plans.metrics", "plans.compiled"]),
    ("maths", ["maths", "maths.attention", "maths.graddrop", "maths.diagnostic"]),
    ("methods", ["methods", "methods.base", "methods.atp", "methods.patching", "methods.baselines", "methods.ig"]),
    ("engine", ["engine", "engine.runner", "engine.checks", "engine.checkpoint", "engine.outputs", "engine.distributed"]),
    ("python api", ["api"]),
    ("tasks", ["tasks", "tasks.base", "tasks.forward", "tasks.ioi", "tasks.city", "tasks.greater_than", "tasks.counting",
               "tasks.rand_pp", "tasks.report", "tasks.registry"]),
    ("analysis", ["analysis", "analysis.verify", "analysis.recall", "analysis.compare", "analysis.plots", "analysis.report", "analysis.session", "analysis.figure_data", "analysis.figures", "analysis.circuits", "analysis.evaluation"]),
    ("entry points", ["cli", "testing", "__init__", "__main__"]),
]
"""The layers of docs/architecture.md, top first (one folder of atpframework/ each, the foundations and the
entry points at the top level): a core module imports only from its own layer or above."""


def test_core_modules_import_only_from_their_layer_or_above():
    files = {m: p for m, p in _package_files().items() if not m.startswith(("atpframework.backends", "atpframework.nodes"))}
    rank = {("atpframework" if m == "__init__" else f"atpframework.{m}"): i for i, (_, layer) in enumerate(LAYERS) for m in layer}
    assert set(files) == set(rank), f"modules missing from LAYERS (and docs/architecture.md): {sorted(set(files) ^ set(rank))}"
    upward = [f"{m} -> {d}" for m, p in files.items() for d in _runtime_imports(p, m, files) if rank[d] > rank[m]]
    assert not upward, "imports from a lower layer:\n" + "\n".join(upward)


def test_every_core_folder_is_one_layer():
    """A newcomer reads the architecture off the folder tree: each folder of atpframework/ is one layer."""
    for name, modules in LAYERS:
        folders = {m.split(".")[0] for m in modules if "." in m}
        assert len(folders) <= 1, f"layer {name} spans folders {sorted(folders)}"
