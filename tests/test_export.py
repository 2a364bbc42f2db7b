"""dhp-export: the bundle of a real trained run is complete, folded, atomic and equal to the eager model.

The session's one trained run and bundle (``served``, in conftest.py) come from real ``dhp-train``
and ``dhp-export`` subprocesses.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dhp_deploy.run_dir import load_model
from dhp_deploy.export import (ATOL, RTOL, ExportError, benchmark_of_run, evaluate_accuracy,
                               export_run, sha256_file)
from dhp_deploy.frozen import fold_model
from dhp_deploy.formats import write_onnx
from dhp_deploy.network import DHPNet, task_logits

from cli_helpers import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def test_sets(served, data_dir):
    run, _ = served
    _, payload = load_model(run)
    return benchmark_of_run(payload, data_dir)


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# ----------------------------------------------------------------------------- the trained run


def test_run_is_trained_with_nonzero_trace(served):
    run, _ = served
    model, payload = load_model(run)
    assert payload["position"]["finished"] and payload["config"]["training"]["epochs"] >= 1
    assert isinstance(model.head, torch.nn.Module) and model.dhp
    hebb = model.head.hebb
    assert hebb.abs().sum() > 0 and (hebb.abs().sum(0) > 0).all(), "every class trace is non-zero"
    alpha_hebb = (model.head.alpha * hebb).abs().max()
    assert alpha_hebb > 1e-6, "the plastic term must change the logits, else folding is untested"


# ----------------------------------------------------------------------------- the bundle


def test_bundle_holds_every_file_with_its_checksum(served):
    _, bundle = served
    manifest = manifest_of(bundle)
    expected = {"model.ts", "model.onnx", "model.pt2", "golden_inputs.npy", "golden_logits.npy",
                "golden_tasks.npy", "golden_labels.npy"}
    assert set(manifest["files"]) == expected
    assert {p.name for p in bundle.iterdir()} == expected | {"manifest.json"}, "one-file ONNX"
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle / name)
        assert entry["bytes"] == (bundle / name).stat().st_size


def test_manifest_describes_the_run(served):
    run, bundle = served
    manifest = manifest_of(bundle)
    _, payload = load_model(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["format"] == "dhp-deploy-bundle" and manifest["format_version"] == 1
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["input"] == {**manifest["input"], "name": "input", "dtype": "float32",
                                 "shape": ["N", 784]}
    assert manifest["output"]["name"] == "logits" and manifest["output"]["shape"] == ["N", 10]
    assert manifest["classes"] == list(range(10))
    assert manifest["task_heads"] == [{"task_id": t["task_id"], "classes": t["classes"]}
                                      for t in payload["benchmark"]["tasks"]]
    assert manifest["training"]["benchmark"] == "split-mnist"
    assert manifest["training"]["method"] == "finetune" and manifest["training"]["seed"] == 0
    assert manifest["metrics"]["acc"] == metrics["acc"]
    assert manifest["metrics"]["acc_matrix"] == metrics["acc_matrix"]
    assert manifest["model"]["head"] == "dhp-folded" and manifest["model"]["hidden"] == [64, 64]
    assert manifest["model"]["flops_per_sample"] == 2 * (784 * 64 + 64 * 64 + 64 * 10)
    golden = manifest["golden"]
    assert golden["inputs"]["shape"] == [64, 784] and golden["logits"]["shape"] == [64, 10]
    assert golden["tolerance"]["atol"] == ATOL and golden["tolerance"]["rtol"] == RTOL


def test_manifest_matches_its_schema(served):
    _, bundle = served
    schema = json.loads((REPO / "export" / "manifest.schema.json").read_text())
    validate(manifest_of(bundle), schema)
    broken = manifest_of(bundle)
    del broken["files"]
    with pytest.raises(AssertionError, match="files"):
        validate(broken, schema)


def validate(value, schema, where="manifest", root=None):
    r"""The subset of JSON Schema the manifest schema uses (jsonschema is not a dependency)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return validate(value, root["$defs"][name], where, root)
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
                  "integer": int, "number": (int, float)}
        ok = any(isinstance(value, python[t]) and not (t in ("integer", "number") and
                                                       isinstance(value, bool)) for t in names)
        assert ok, f"{where}: {value!r:.80} is not {types}"
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema and isinstance(value, str):
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    if "minimum" in schema and isinstance(value, (int, float)):
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}", root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(value) - set(schema.get("properties", {})):
                validate(value[key], extra, f"{where}.{key}", root)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]", root)


def test_onnx_is_checker_clean_single_file_with_dynamic_batch(served):
    import onnx

    _, bundle = served
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value and dims[1].dim_value == 784
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_goldens_are_real_test_images_with_eager_logits(served, test_sets):
    run, bundle = served
    model, _ = load_model(run)
    x = np.load(bundle / "golden_inputs.npy")
    tasks = np.load(bundle / "golden_tasks.npy")
    labels = np.load(bundle / "golden_labels.npy")
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert set(tasks.tolist()) == set(range(5)), "goldens cover every task"
    pool = {tuple(row) for t in test_sets.tasks for row in t.x_test.numpy()}
    assert all(tuple(row) in pool for row in x), "golden inputs are the run's test images"
    assert all(label in test_sets.tasks[task].classes for task, label in zip(tasks, labels))
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    # Computed in another process (dhp-export): equal up to GEMM scheduling, far below ATOL.
    np.testing.assert_allclose(np.load(bundle / "golden_logits.npy"), eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- folding


def test_fold_is_the_eager_effective_matrix(served):
    run, _ = served
    model, _ = load_model(run)
    frozen = fold_model(model)
    head = model.head
    effective = torch.addcmul(head.w, head.alpha, head.hebb).detach()
    assert torch.equal(frozen.head.weight.t(), effective)
    assert frozen.head.bias is None and not frozen.training
    assert not torch.equal(frozen.head.weight.t(), head.w.detach()), "the trace is folded in"


def test_fold_equals_the_eval_forward_on_a_random_trace():
    # The fold's maths alone (no run, no MNIST): θ + α ⊙ Hebb for a non-trivial α and trace.
    torch.manual_seed(0)
    model = DHPNet(hidden=(32, 16), dhp=True).eval()
    with torch.no_grad():
        model.head.hebb.uniform_(-1.0, 1.0)
        model.head.alpha.uniform_(-0.5, 0.5)
    x = torch.rand(50, 784)
    with torch.no_grad():
        torch.testing.assert_close(fold_model(model)(x), model(x), rtol=1e-5, atol=1e-6)
        hebb_free = model.head.w + model.head.alpha * model.head.hebb
        torch.testing.assert_close(fold_model(model).head.weight, hebb_free.t())


def test_plain_head_folds_to_itself():
    torch.manual_seed(0)
    plain = DHPNet(hidden=(32, 16), dhp=False).eval()
    frozen = fold_model(plain)
    assert torch.equal(frozen.head.weight, plain.head.linear.weight)
    x = torch.rand(50, 784)
    with torch.no_grad():
        assert torch.equal(frozen(x), plain(x))


def test_folded_bundle_is_structurally_a_plain_mlp(served, tmp_path):
    import onnx

    _, bundle = served
    torch.manual_seed(0)
    plain = fold_model(DHPNet(hidden=(64, 64), dhp=False).eval())
    write_onnx(plain, tmp_path / "plain.onnx")
    folded, baseline = onnx.load(str(bundle / "model.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in baseline.graph.node]
    shapes = lambda m: sorted(tuple(t.dims) for t in m.graph.initializer)  # noqa: E731
    assert shapes(folded) == shapes(baseline), "same parameters, so the same FLOPs and memory"
    scripted = torch.jit.load(str(bundle / "model.ts"))
    assert sum(p.numel() for p in scripted.parameters()) == sum(p.numel() for p in plain.parameters())


# ----------------------------------------------------------------------------- parity


def _runtimes(bundle):
    from dhp_deploy.runtime import open_bundle

    return {backend: open_bundle(bundle, backend=backend) for backend in ("torchscript", "onnx", "pt2")}


def test_parity_eager_torchscript_onnx_large_batch_and_batch_one(served, test_sets):
    run, bundle = served
    model, _ = load_model(run)
    x = torch.cat([t.x_test for t in test_sets.tasks])
    assert len(x) >= 4096
    with torch.no_grad():
        eager = model(x).numpy()
    rows = np.linspace(0, len(x) - 1, 40).astype(int)
    for backend, runtime in _runtimes(bundle).items():
        large = runtime.logits(x[:4096].numpy())
        np.testing.assert_allclose(large, eager[:4096], rtol=RTOL, atol=ATOL, err_msg=backend)
        full = runtime.logits(x.numpy())  # the whole test set as one batch
        np.testing.assert_allclose(full, eager, rtol=RTOL, atol=ATOL, err_msg=backend)
        assert (full.argmax(1) == eager.argmax(1)).all(), backend
        single = np.concatenate([runtime.logits(x[i:i + 1].numpy()) for i in rows])
        np.testing.assert_allclose(single, eager[rows], rtol=RTOL, atol=ATOL, err_msg=backend)


def test_task_head_predictions_identical_to_eager(served, test_sets):
    run, bundle = served
    model, _ = load_model(run)
    runtimes = _runtimes(bundle)
    for task in test_sets.tasks:
        classes = torch.tensor(task.classes)
        with torch.no_grad():
            eager = classes[task_logits(model(task.x_test), classes).argmax(1)].numpy()
        for backend, runtime in runtimes.items():
            out = runtime.predict(task.x_test.numpy(), task=task.task_id)
            assert out.classes.tolist() == list(task.classes)
            np.testing.assert_array_equal(out.labels, eager, err_msg=backend)


def test_bundle_accuracy_equals_the_runs_reported_accuracy(served, test_sets):
    run, bundle = served
    metrics = json.loads((run / "metrics.json").read_text())
    reported = metrics["acc_matrix"][-1]
    for backend, runtime in _runtimes(bundle).items():
        counts = evaluate_accuracy(runtime.logits, test_sets)
        assert [total for _, total in counts] == [len(t.y_test) for t in test_sets.tasks]
        # As counts: the reported fraction times the task size is the bundle's count exactly.
        assert [correct for correct, _ in counts] == \
            [round(acc * total) for acc, (_, total) in zip(reported, counts)], backend
        bundle_acc = sum(correct / total for correct, total in counts) / len(counts)
        assert bundle_acc == pytest.approx(metrics["acc"], abs=1e-12), backend


# ----------------------------------------------------------------------------- atomic writes


def test_failure_before_commit_leaves_nothing(served, tmp_path, data_dir):
    run, _ = served

    def explode(tmp):
        assert (tmp / "manifest.json").exists(), "the hook runs on a complete temporary bundle"
        raise RuntimeError("injected failure")

    out = tmp_path / "bundles" / "b"
    with pytest.raises(RuntimeError, match="injected"):
        export_run(run, out, ("torchscript",), data_dir=data_dir, _before_commit=explode)
    assert not out.exists()
    assert list((tmp_path / "bundles").iterdir()) == [], "no temporary directory left behind"


def test_failure_mid_export_leaves_nothing(served, tmp_path, monkeypatch, data_dir):
    from dhp_deploy.formats import WRITERS

    run, _ = served

    def broken_onnx(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(WRITERS, "onnx", broken_onnx)
    with pytest.raises(ExportError, match="No space left"):
        export_run(run, tmp_path / "b", ("torchscript", "onnx"), data_dir=data_dir)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_bundle_only_when_asked(served, tmp_path, data_dir):
    run, bundle = served
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    before = manifest_of(out)
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, out, ("torchscript",), data_dir=data_dir)
    assert manifest_of(out) == before
    export_run(run, out, ("torchscript",), data_dir=data_dir, overwrite=True, golden_count=8)
    assert set(manifest_of(out)["artifacts"]) == {"torchscript"}
    assert not (out / "model.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_never_deletes_the_run_or_a_folder_it_did_not_write(served, tmp_path,
                                                                      data_dir):
    # --overwrite replaces an earlier export; pointed at the run itself, a folder holding it or
    # a folder of other files, it used to move them aside and delete them.
    from dhp_deploy.triton import write_triton_repository

    run, _ = served
    copy = tmp_path / "runs" / "run"
    shutil.copytree(run, copy)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("important")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, message in [(copy, "holds the run being exported"),
                         (copy.parent, "holds the run being exported"),
                         (notes, "is not an earlier export")]:
        result = run_cli("export", copy, "--format", "onnx", "--out", out, "--overwrite",
                         "--data-dir", data_dir)
        assert_one_line_error(result, str(out), message)
    with pytest.raises(ExportError, match="is not an earlier export"):
        write_triton_repository(copy, notes, overwrite=True, data_dir=data_dir)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (notes / "thesis.txt").read_text() == "important"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(copy, empty, ("onnx",), data_dir=data_dir, overwrite=True, golden_count=8)
    assert manifest_of(empty)["artifacts"] == {"onnx": "model.onnx"}


def test_cli_bad_out_parent_leaves_nothing(served, tmp_path, data_dir):
    run, _ = served
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the bundle's parent should be")
    result = run_cli("export", run, "--out", blocker / "bundle", "--data-dir", data_dir)
    assert_one_line_error(result, "not-a-dir", "is a file, not a directory")
    assert blocker.read_text().startswith("a file") and sorted(tmp_path.iterdir()) == [blocker]


def test_cli_refuses_existing_bundle_and_bad_runs(served, tmp_path):
    run, bundle = served
    assert_one_line_error(run_cli("export", run, "--out", bundle), "already exists", "--overwrite")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert_one_line_error(run_cli("export", empty, "--out", tmp_path / "b"), "no checkpoint")
    assert_one_line_error(run_cli("export", tmp_path / "missing", "--out", tmp_path / "b"),
                    "does not exist")
    assert_one_line_error(run_cli("export", run, "--format", "tflite", "--out", tmp_path / "b"),
                    "tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-run"]


def test_cli_refuses_an_unfinished_run(served, tmp_path):
    run, _ = served
    unfinished = tmp_path / "run"
    shutil.copytree(run, unfinished)
    payload = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    payload["position"]["finished"] = False
    torch.save(payload, unfinished / "checkpoint.pt")
    result = run_cli("export", unfinished, "--out", tmp_path / "b")
    assert_one_line_error(result, "has not finished", "--allow-unfinished")
    assert not (tmp_path / "b").exists()


def test_a_bundle_that_fails_verification_is_never_written(served, tmp_path, data_dir):
    from dhp_deploy.sessions import verify_bundle

    run, _ = served

    def tamper_then_verify(bundle, formats):  # a file changed after the manifest was written
        np.save(bundle / "golden_logits.npy", np.load(bundle / "golden_logits.npy") + 1.0)
        verify_bundle(bundle, formats)

    out = tmp_path / "bundles" / "b"
    with pytest.raises(ExportError, match="failed verification"):
        export_run(run, out, ("onnx",), data_dir=data_dir, verify=tamper_then_verify)
    assert not out.exists() and list((tmp_path / "bundles").iterdir()) == []


def test_train_export_and_serve_run_on_synthetic_files(synthetic_mnist, tmp_path):
    r"""The whole data → train → export → serve path in-process on synthetic MNIST-format files
    (the fast lane): frozen and plastic bundles, TorchScript and ONNX, each verified against its
    goldens before it is committed, then opened and checked again."""
    from dhp_deploy.plastic_session import PlasticSession
    from dhp_deploy.runtime import open_bundle
    from dhp_deploy.sessions import verify_bundle
    from dhp_deploy.tasks import build_benchmark
    from dhp_deploy.train import TrainConfig, TrainingRun

    config = TrainConfig(benchmark="split-mnist", method="si", num_tasks=2, epochs=1,
                         hidden=(32,), train_limit=256, test_limit=100, batch_size=32, lr=0.1)
    benchmark = build_benchmark(**config.data_arguments(), data_dir=synthetic_mnist)
    metrics = TrainingRun.start(config, benchmark, tmp_path / "run").run()
    assert min(metrics["acc_matrix"][1]) > 0.75  # both tasks learnt (chance: 0.5)
    formats = ("torchscript", "onnx")
    frozen = export_run(tmp_path / "run", tmp_path / "frozen", formats, golden_count=64,
                        data_dir=synthetic_mnist, verify=verify_bundle)
    plastic = export_run(tmp_path / "run", tmp_path / "plastic", formats, golden_count=64,
                         data_dir=synthetic_mnist, plastic=True, verify=verify_bundle)
    for backend in formats:
        assert open_bundle(frozen, backend=backend).check()["ok"]
        assert PlasticSession(plastic, backend=backend).check()["ok"]
