"""The package's shape: imports follow the data path without cycles; serving with onnxruntime
needs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dhp_deploy"
# data → model → train → export → serve → command line: a module may import only from its own
# stage or earlier ones.
STAGES = {"data": 0, "tasks": 0, "layer": 1, "network": 1, "fused_head": 1, "lean_step": 2,
          "cuda_graph": 2, "distributed": 2,
          "plastic": 3, "triton": 3, "plastic_session": 4,
          "regularizers": 2, "metrics": 2, "run_dir": 2, "train": 2, "cohort": 2, "bundle": 3,
          "export": 3,
          "runtime": 4, "cli": 5}


def import_graph() -> dict:
    r"""``{module: {dhp_deploy modules it imports anywhere, function bodies included}}``."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dhp_deploy"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("dhp_deploy")}
        graph[name] = imported - {name, "dhp_deploy"}  # the root only re-exports, lazily
    return graph


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES[parts[1]] if len(parts) > 1 else -1


def test_imports_form_a_chain_without_cycles():
    graph = import_graph()
    assert set(STAGES) >= {name.split(".")[1] for name in graph if "." in name}, \
        "a new module needs its place in STAGES"
    backwards = [(m, d) for m, deps in graph.items() for d in deps if stage(d) > stage(m)]
    assert backwards == [], "a module imports from a later stage"
    visiting, done = set(), set()

    def visit(module, path):
        assert module not in visiting, f"import cycle: {' → '.join(path + [module])}"
        if module in done:
            return
        visiting.add(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_serving_a_bundle_with_onnxruntime_imports_no_torch(served):
    _, bundle = served
    script = f"""
import sys
import numpy as np
from dhp_deploy.runtime import open_bundle
runtime = open_bundle({str(bundle)!r}, backend="onnx")
assert runtime.check()["ok"]
runtime.predict(np.zeros((2, runtime.in_features), np.float32), task=1)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(loaded)
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
