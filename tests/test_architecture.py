"""The package's shape: imports follow the data path without cycles; serving with onnxruntime
needs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dhp_deploy"
# data → model → train → export → serve → command line: a module may import only from its own
# stage or earlier ones. io (atomic writes) is a utility below every stage: it sits with data,
# which imports it, and imports nothing of the package itself (checked below).
STAGES = {
    **dict.fromkeys(("io", "data", "tasks"), 0),
    **dict.fromkeys(("layer", "network", "fused_head"), 1),
    **dict.fromkeys(("lean_step", "cuda_graph", "distributed", "importance", "evaluation",
                     "stability", "regularizer_base", "regularizers", "metrics", "run_dir",
                     "config", "steps", "loop", "train", "cohort"), 2),
    **dict.fromkeys(("frozen", "plastic", "bundle", "bundle_kinds", "formats", "export", "triton",
                     "triton_repository"), 3),
    **dict.fromkeys(("plastic_session", "runtime", "sessions"), 4),
    "cli": 5,
}


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


def test_io_is_below_every_stage():
    assert import_graph()["dhp_deploy.io"] == set(), "dhp_deploy.io imports nothing of the package"


def assert_imports_no_torch(body: str) -> str:
    r"""Run ``body`` in a fresh interpreter; fail if it fails or leaves torch in sys.modules."""
    script = body + """
ours = sorted(m for m in sys.modules if m.startswith("dhp_deploy"))
assert "torch" not in sys.modules, f"torch was loaded; the package's modules loaded: {ours}"
"""
    result = subprocess.run([sys.executable, "-c", "import sys\n" + script], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def dhp_serve(*args) -> str:
    r"""Python that runs ``dhp-serve ARGS`` in its own process, so sys.modules then shows what
    the command loaded; a failing command raises."""
    return (f"from dhp_deploy.cli.serve import main\n"
            f"main({[str(a) for a in args]!r}, standalone_mode=False)\n")


def test_serving_a_bundle_with_onnxruntime_imports_no_torch(served):
    _, bundle = served
    assert_imports_no_torch(f"""
import numpy as np
from dhp_deploy.runtime import open_bundle
runtime = open_bundle({str(bundle)!r}, backend="onnx")
assert runtime.check()["ok"]
runtime.predict(np.zeros((2, runtime.in_features), np.float32), task=1)
""")


@pytest.mark.parametrize("command", ["check", "predict", "bench"])
def test_dhp_serve_with_onnxruntime_imports_no_torch(served, tmp_path, command):
    _, bundle = served
    np.save(tmp_path / "x.npy", np.load(bundle / "golden_inputs.npy")[:4])
    out = tmp_path / "out.npz"
    args = {"check": (),
            "predict": ("--input", tmp_path / "x.npy", "--output", out, "--task", 1),
            "bench": ("--iters", 10, "--batch-size", 8, "--repeats", 1)}[command]
    assert_imports_no_torch(dhp_serve(command, bundle, "--backend", "onnx", *args))
    if command == "predict":  # the output is written (atomically) without torch too
        with np.load(out) as saved:
            assert saved["logits"].shape == (4, 2) and saved["labels"].shape == (4,)


def test_a_plastic_session_with_onnxruntime_imports_no_torch(served, tmp_path, data_dir):
    from dhp_deploy.export import export_run

    run, _ = served
    bundle = export_run(run, tmp_path / "plastic", ("onnx",), data_dir=data_dir, plastic=True,
                        golden_count=60)
    assert_imports_no_torch(f"""
import numpy as np
from dhp_deploy.plastic_session import PlasticSession
session = PlasticSession({str(bundle)!r}, backend="onnx")
assert session.check()["ok"]
session.step(np.zeros((2, session.in_features), np.float32), np.array([0, -1]))
""" + dhp_serve("check", bundle, "--backend", "onnx"))


def test_no_module_of_the_package_outgrows_a_reading():
    # One job per module: past ~450 lines a module holds more than one (issue-level rule).
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert not {name: lines for name, lines in sizes.items() if lines > 450}
