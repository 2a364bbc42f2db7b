r"""benchmarks/reproduce.py and results.py on a tiny grid of real training runs.

Tiny: Split MNIST's first 2 tasks, 200 training / 100 test examples per task, hidden 16, 1 epoch,
2 methods × {plain, DHP} × 2 seeds. Checks that finished runs are skipped, interrupted ones
(a ``dhp-train`` killed mid-run) resumed to the same result as an uninterrupted run, that a run
directory of other settings is refused, that the search chooses by validation accuracy, and that
the report's numbers are the runs' numbers. Plus: the committed docs/RESULTS.md regenerates from
the committed summaries.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402
import results  # noqa: E402
from reproduction import naming  # noqa: E402
from reproduction.jobs import grid_jobs  # noqa: E402

TINY = ["--benchmarks", "split-mnist", "--epochs", "1", "--num-tasks", "2", "--train-limit", "200",
        "--test-limit", "100", "--hidden", "16", "--fisher-samples", "20",
        "--jobs", "1"]  # in this process (the default, auto, would start one per core)
TAG = "e1-h16-t2-n200-m100-f20"
VARIANTS = ("finetune", "dhp", "ewc", "dhp+ewc")


def grid(tmp: Path, *extra: str) -> int:
    return reproduce.main(["grid", "--runs", str(tmp / "runs"), "--summaries", str(tmp / "sum"),
                           "--variants", ",".join(VARIANTS), "--seeds", "0-1", *TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def data_root_in_environment():
    # reproduce.py reads its --data-dir default from $DHP_DATA_DIR: set for this module only.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DHP_DATA_DIR", os.environ.get("DHP_DATA_DIR")
                     or str(REPO.parent / "shared" / "data"))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("reproduce")
    # As a search would have chosen for this tiny protocol (Split MNIST's λ = 10⁴ is too stiff
    # for these 16-unit nets at lr 0.01: the stability check refuses it).
    (tmp / "sum").mkdir()
    (tmp / "sum" / "strengths.json").write_text(json.dumps(
        {f"split-mnist@{TAG}": {"ewc": {"ewc_lambda": 100.0}}}))
    assert grid(tmp) == 0
    return tmp


def test_grid_writes_runs_and_summaries(tiny):
    for variant in VARIANTS:
        for seed in (0, 1):
            run_dir = tiny / "runs" / "split-mnist" / TAG / variant / f"seed{seed}"
            assert (run_dir / "metrics.json").exists() and (run_dir / "checkpoint.pt").exists()
            summary = json.loads((tiny / "sum" / "runs" / "split-mnist" / TAG / variant /
                                  f"seed{seed}.json").read_text())
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert summary["kind"] == naming.SUMMARY_KIND and summary["seed"] == seed
            assert summary["variant"] == variant and summary["protocol"] == TAG
            assert summary["metrics"]["acc_matrix"] == metrics["acc_matrix"]
            assert summary["config"]["training"]["hidden"] == [16]
            if (REPO / ".git").exists():  # provenance must be there when git can give it
                assert len(summary["commit"]) == 40 and summary["sessions"], summary["commit"]
            assert summary["command"].startswith("dhp-train --benchmark split-mnist --method")
            assert "checkpoint" not in json.dumps(summary["metrics"])  # small: numbers only
            assert summary["setting"] == {"jobs": 1, "cohort": 1}  # how the grid ran


def test_the_grid_setting_is_chosen_per_device():
    from reproduction.runs import GPU_COHORT, auto_setting

    jobs, cohort, _ = auto_setting("cuda", "auto", "auto")
    assert (jobs, cohort) == (1, GPU_COHORT)  # one process stacking runs on a GPU
    jobs, cohort, why = auto_setting("cpu", "auto", "auto")
    assert cohort == 1 and 1 <= jobs <= os.cpu_count() and "one-thread processes" in why
    assert auto_setting("cpu", 3, 2)[:2] == (3, 2)  # a value given is kept
    args = reproduce.parse_arguments(["grid", "--device", "cuda"])
    assert (args.jobs, args.cohort) == (1, GPU_COHORT)


def test_finished_runs_are_skipped(tiny, capsys):
    metrics = sorted((tiny / "runs").rglob("metrics.json"))
    before = {path: path.stat().st_mtime_ns for path in metrics}
    capsys.readouterr()
    assert grid(tiny) == 0
    out = capsys.readouterr().out
    assert out.count(": skipped") == len(VARIANTS) * 2
    assert "0 trained (0 resumed), 8 already finished" in out
    assert {path: path.stat().st_mtime_ns for path in metrics} == before


def test_interrupted_dhp_train_run_is_resumed_exactly(tiny, tmp_path, capsys):
    # A run started by dhp-train and killed mid-task, in the place reproduce expects it.
    pytest.importorskip("dhp_deploy.cli.train")
    run_dir = tmp_path / "runs" / "split-mnist" / TAG / "dhp" / "seed0"
    command = [sys.executable, "-m", "dhp_deploy.cli.train", "--benchmark", "split-mnist",
               "--method", "finetune", "--dhp", "--epochs", "1", "--num-tasks", "2",
               "--train-limit", "200", "--test-limit", "100", "--hidden", "16",
               "--fisher-samples", "20", "--seed", "0", "--device", "cpu", "--quiet",
               "--no-eta-bound", "--out", str(run_dir)]  # the reproduction's: the paper's η
    env = {**os.environ, "DHP_TRAIN_FAULT": "sigkill-after-steps=4"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert killed.returncode < 0, killed.stderr  # died by the signal, no metrics
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
    capsys.readouterr()
    assert reproduce.main(["grid", "--runs", str(tmp_path / "runs"), "--summaries",
                           str(tmp_path / "sum"), "--variants", "dhp", "--seeds", "0",
                           *TINY]) == 0
    assert "1 trained (1 resumed)" in capsys.readouterr().out
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((tiny / "runs" / "split-mnist" / TAG / "dhp" / "seed0" /
                           "metrics.json").read_text())
    assert resumed["acc_matrix"] == straight["acc_matrix"]


def test_run_directory_of_other_settings_is_refused(tiny, capsys):
    # Other strengths chosen later: the finished EWC runs no longer fit; refuse, never mix.
    strengths = tiny / "other-strengths.json"
    strengths.write_text(json.dumps({"split-mnist": {"ewc": {"ewc_lambda": 5.0}}}))
    assert grid(tiny, "--strengths", str(strengths)) == 2
    assert "holds a run with other settings (ewc_lambda)" in capsys.readouterr().err


def test_search_chooses_by_validation_accuracy(tmp_path, data_dir, capsys):
    argv = ["search", "--runs", str(tmp_path / "runs"), "--summaries", str(tmp_path / "sum"),
            "--methods", "si", *TINY[2:]]
    assert reproduce.main(argv) == 0
    key = f"split-mnist@{TAG}"  # the choice serves grids of the search's protocol
    chosen = json.loads((tmp_path / "sum" / "strengths.json").read_text())[key]["si"]
    trials = chosen["trials"]
    tried = [t["si_c"] for t in trials]
    assert set(reproduce.SEARCH_VALUES["si"]) <= set(tried) and len(tried) <= 3 + 2
    assert chosen["val_acc"] == max(t["val_acc"] for t in trials)
    assert chosen["si_c"] == next(t["si_c"] for t in trials if t["val_acc"] == chosen["val_acc"])
    assert chosen["val_fraction"] == 0.1
    if chosen["at_edge"]:  # an edge optimum only once both extensions were tried
        assert len(tried) == 5
    # Each run counted once, though every round lists the earlier rounds' runs again.
    assert f"search: {len(tried)} trained (0 resumed), 0 already finished, 0 diverged" in \
        capsys.readouterr().out
    summaries = sorted((tmp_path / "sum" / "search").rglob("*.json"))
    assert len(summaries) == len(tried)
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["role"] == "search" and summary["config"]["training"]["val_fraction"] == 0.1
        assert len(summary["metrics"]["val_avg_acc"]) == 2


def _table_row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_numbers_are_the_runs_numbers(tiny):
    out = tiny / "report" / "RESULTS.md"
    assert results.main(["--from", str(tiny / "sum"), "--out", str(out)]) == 0
    text = out.read_text()
    final = {}
    for variant in VARIANTS:
        final[variant] = [json.loads((tiny / "runs" / "split-mnist" / TAG / variant / f"seed{s}" /
                                      "metrics.json").read_text())["avg_acc"][-1] for s in (0, 1)]
        row = _table_row(text, naming.display_name(variant))
        mean, std = statistics.fmean(final[variant]), statistics.stdev(final[variant])
        assert row[1] == "0,1" and row[2] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    gains = [d - b for d, b in zip(final["dhp+ewc"], final["ewc"])]
    gain = f"{100 * statistics.fmean(gains):.2f} ± {100 * statistics.stdev(gains):.2f} (n=2)"
    row = _table_row(text, "DHP+EWC")
    assert row[7] == gain  # columns: method, seeds, mean, median, collapsed, BWT, forgetting, gain
    assert row[3] == f"{100 * statistics.median(final['dhp+ewc']):.2f}"
    curves = [json.loads((tiny / "runs" / "split-mnist" / TAG / "dhp+ewc" / f"seed{s}" /
                          "metrics.json").read_text())["avg_acc"] for s in (0, 1)]
    drops = sum(any(a - b > 0.2 for a, b in zip(c, c[1:])) for c in curves)
    assert row[4] == f"{drops} of 2"
    assert "| Online EWC | — | not run yet |" in text
    assert (out.parent / f"results-split-mnist-{TAG}.png").stat().st_size > 1000
    # The same report straight from the run directories (summarised on the fly).
    again = tiny / "report-from-runs" / "RESULTS.md"
    assert results.main(["--from", str(tiny / "runs"), "--out", str(again)]) == 0
    assert _table_row(again.read_text(), "DHP+EWC") == _table_row(text, "DHP+EWC")


def _committed_records(into: Path) -> str:
    r"""HEAD's docs/results/ extracted under ``into``; returns HEAD's docs/RESULTS.md. The
    committed state, not the working tree, where a running grid adds summaries."""
    def git(*args, **kwargs):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True, **kwargs)

    try:
        committed = git("show", "HEAD:docs/RESULTS.md", text=True).stdout
        archive = git("archive", "HEAD", "docs/results").stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no committed docs/RESULTS.md and docs/results/ (or no git)")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return committed


def test_committed_report_regenerates_from_committed_summaries(tmp_path, monkeypatch):
    committed = _committed_records(tmp_path)
    monkeypatch.chdir(tmp_path)  # the report quotes its --from argument
    assert results.main(["--from", "docs/results", "--out", "docs/RESULTS.md"]) == 0
    assert (tmp_path / "docs" / "RESULTS.md").read_text() == committed


@pytest.mark.slow
def test_make_reproduce_on_the_committed_records_trains_nothing(tmp_path):
    # The README's reproduction steps, as subprocesses, against a copy of the committed records:
    # every run is recorded, so nothing trains (no data needed) and the report comes back byte
    # for byte, with the strengths each search prints equal to the committed strengths.json.
    committed = _committed_records(tmp_path)
    summaries = tmp_path / "docs" / "results"
    strengths = (summaries / "strengths.json").read_bytes()
    where = ["--summaries", str(summaries), "--runs", str(tmp_path / "runs")]
    env = {**os.environ, "DHP_DATA_DIR": str(tmp_path / "no-data")}  # a run would fail loudly
    steps = [["reproduce.py", "search", "--jobs", "2", *where],
             ["reproduce.py", "search", "--benchmark", "permuted-mnist", "--jobs", "2", *where],
             ["reproduce.py", "grid", "--jobs", "2", *where],
             ["results.py", "--from", "docs/results", "--out", "docs/RESULTS.md"]]
    printed = ""
    for script, *args in steps:
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                                cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        printed += result.stdout
    assert printed.count(" 0 trained (0 resumed)") == 3
    assert "to train" not in printed.replace("0 to train", "")
    assert not (tmp_path / "runs").exists()
    assert (summaries / "strengths.json").read_bytes() == strengths
    chosen = json.loads(strengths)
    for benchmark in ("split-mnist", "permuted-mnist"):
        for method, entry in chosen[benchmark].items():
            option = next(key for key in entry if key not in ("val_acc", "trials"))
            last = [line for line in printed.splitlines()
                    if line.startswith(f"{benchmark} {method}:")][-1]
            assert f"{option} = {entry[option]:g} " in last, last
    assert (tmp_path / "docs" / "RESULTS.md").read_text() == committed


def test_summaries_of_every_committed_format_read():
    from reproduction.records import migrate_summary, read_summary

    current = next((REPO / "docs" / "results" / "runs").rglob("seed0.json"), None)
    if current is None:
        pytest.skip("no committed summaries")
    record = json.loads(current.read_text())
    # A version-1-era summary: before diverged, dirty/sessions, plasticity and the diagnostics.
    old = {key: value for key, value in record.items()
           if key not in ("diverged", "dirty", "sessions", "variant")}
    old["metrics"] = {key: record["metrics"][key]
                      for key in ("acc_matrix", "avg_acc", "acc", "bwt", "forgetting")}
    read = migrate_summary(old)
    assert read["diverged"] is None and read["sessions"] == [] and read["dirty"] == []
    assert read["variant"] == record["variant"]
    for field in ("plasticity", "val_acc_matrix", "val_avg_acc", "acc_matrix_trace_zeroed",
                  "acc_matrix_own_trace", "trace_diagnostics"):
        assert read["metrics"][field] is None
    assert read["metrics"]["acc_matrix"] == record["metrics"]["acc_matrix"]
    # Every committed summary reads, and reads the same through each entry point.
    for folder in ("runs", "search", "trace"):
        for path in (REPO / "docs" / "results" / folder).rglob("seed*.json"):
            record = read_summary(path)
            assert record["metrics"] is None or "plasticity" in record["metrics"], path


def test_search_plan_matches_the_committed_choice(tmp_path):
    # A stored choice must not stop the search's extension short (it once printed "every
    # strength diverged" for SI on Permuted MNIST while strengths.json held the extended 0.01).
    from reproduction.jobs import choose_strengths, search_jobs
    committed = REPO / "docs" / "results"
    if not (committed / "strengths.json").exists():
        pytest.skip("no committed strengths")
    args = reproduce.parse_arguments(["search", "--benchmark", "permuted-mnist", "--summaries",
                                      str(committed), "--runs", str(tmp_path / "runs")])
    jobs = search_jobs(args, {"si": [0.1, 1.0, 10.0]})
    assert choose_strengths(jobs, "permuted-mnist", committed / "strengths.json", print,
                            write=False) == {}
    assert reproduce.extend_values({"si": [0.1, 1.0, 10.0]}, {}, jobs, print)


def test_diverged_run_is_recorded_not_retried(tmp_path, data_dir, capsys):
    argv = ["grid", "--runs", str(tmp_path / "runs"), "--summaries", str(tmp_path / "sum"),
            "--variants", "finetune", "--seeds", "0", *TINY, "--lr", "1e30"]
    assert reproduce.main(argv) == 0
    assert "1 diverged" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").rglob("seed0")
    assert (run_dir / "diverged.json").exists() and not (run_dir / "metrics.json").exists()
    (summary_path,) = (tmp_path / "sum").rglob("seed0.json")
    summary = json.loads(summary_path.read_text())
    assert summary["metrics"] is None and "diverged" in summary["diverged"]["error"]
    assert reproduce.main(argv) == 0  # not retried: the same settings diverge the same way
    assert "1 diverged" in capsys.readouterr().out
    out = tmp_path / "RESULTS.md"
    assert results.main(["--from", str(tmp_path / "sum"), "--out", str(out)]) == 0
    assert ("- stopped without an accuracy (the loss or the weights became non-finite; not "
            "retried): split-mnist") in out.read_text()


def test_parallel_grid_equals_sequential_and_reports_progress(tiny, tmp_path, capsys):
    capsys.readouterr()
    assert reproduce.main(["grid", "--runs", str(tmp_path / "runs"), "--summaries",
                           str(tmp_path / "sum"), "--strengths", str(tiny / "sum" /
                           "strengths.json"), "--variants", ",".join(VARIANTS), "--seeds", "0-1",
                           "--jobs", "2", *TINY]) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[-1].startswith("[8/8 done, ETA")
    for variant in VARIANTS:  # one-thread worker processes: the same bits as one process
        for seed in (0, 1):
            parallel, sequential = (json.loads((root / "runs" / "split-mnist" / TAG / variant /
                                                f"seed{seed}" / "metrics.json").read_text())
                                    for root in (tmp_path, tiny))
            assert parallel["acc_matrix"] == sequential["acc_matrix"], (variant, seed)


def test_a_cohort_grid_equals_the_one_by_one_grid(tiny, tmp_path, capsys, monkeypatch):
    from reproduction import runs
    built, build = [], runs.build_benchmark  # the seeds of the benchmarks the grid builds

    def counted(**arguments):
        built.append(arguments["seed"])
        return build(**arguments)
    monkeypatch.setattr(runs, "build_benchmark", counted)
    capsys.readouterr()
    argv = ["grid", "--runs", str(tmp_path / "runs"), "--summaries", str(tmp_path / "sum"),
            "--strengths", str(tiny / "sum" / "strengths.json"), "--variants",
            ",".join(VARIANTS), "--seeds", "0-1", *TINY]
    with pytest.raises(SystemExit):
        reproduce.main([*argv, "--cohort", "0"])
    assert "argument --cohort: '0' is not a positive whole number" in capsys.readouterr().err
    assert reproduce.main([*argv, "--cohort", "4", "--stop-after", "0"]) == 0  # all postponed
    assert "8 runs left for a later sitting" in capsys.readouterr().out
    assert not (tmp_path / "sum").exists() and not (tmp_path / "runs").exists()
    assert reproduce.main([*argv, "--cohort", "4"]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[-1].startswith("[8/8 done, ETA 0s]")
    # A cohort's runs finish together: their lines share the ETA after the whole cohort.
    assert progress[0].startswith("[1/8 done, ETA") and progress[3].startswith("[4/8 done, ETA")
    assert progress[0].split("ETA")[1].split("]")[0] == progress[3].split("ETA")[1].split("]")[0]
    assert all("(its share: 4 runs trained together)" in line for line in progress)
    assert sorted(built) == [0, 0, 1, 1]  # a stack's runs of one seed share one benchmark
    for variant in VARIANTS:  # plain and DHP heads: two stacks of 4 (2 methods × 2 seeds)
        for seed in (0, 1):
            together, alone = (json.loads((root / "runs" / "split-mnist" / TAG / variant /
                                           f"seed{seed}" / "metrics.json").read_text())
                               for root in (tmp_path, tiny))
            assert together["timings"]["cohort_runs"] == 4
            for row_together, row_alone in zip(together["acc_matrix"], alone["acc_matrix"]):
                assert row_together == pytest.approx(row_alone, abs=0.011), (variant, seed)
            assert (tmp_path / "sum" / "runs" / "split-mnist" / TAG / variant /
                    f"seed{seed}.json").exists()


def test_a_cohort_grid_resumes_runs_left_at_different_epochs(tiny, tmp_path, capsys):
    # A cohort killed between its runs' checkpoints leaves them an epoch apart: each position's
    # runs resume as a cohort of their own, and every run ends as the one-by-one grid's.
    from dhp_deploy.tasks import build_benchmark
    from dhp_deploy.train import TrainingRun
    from reproduction.jobs import grid_jobs

    def argv_of(name):
        return ["grid", "--runs", str(tmp_path / name), "--summaries",
                str(tmp_path / f"{name}-sum"),
                "--strengths", str(tiny / "sum" / "strengths.json"), "--variants", "finetune,ewc",
                "--seeds", "0-1", *TINY, "--epochs", "2"]

    argv = argv_of("runs")
    (config, run_dir, _, _), = [job for job in grid_jobs(reproduce.parse_arguments(argv))
                                if job[1].parts[-2:] == ("finetune", "seed1")]
    ahead = TrainingRun.start(config, build_benchmark(**config.data_arguments()), run_dir)
    next(ahead.epochs())  # task 1 epoch 1 done, the others not started
    capsys.readouterr()
    assert reproduce.main([*argv, "--cohort", "4"]) == 0
    assert "4 trained (1 resumed)" in capsys.readouterr().out
    assert reproduce.main(argv_of("alone")) == 0
    for variant in ("finetune", "ewc"):
        for seed in (0, 1):
            together, alone = (json.loads((tmp_path / root / "split-mnist" /
                                           "e2-h16-t2-n200-m100-f20" / variant / f"seed{seed}" /
                                           "metrics.json").read_text())
                               for root in ("runs", "alone"))
            stacked = 1 if (variant, seed) == ("finetune", 1) else 3  # the two positions' cohorts
            assert together["timings"].get("cohort_runs", 1) == stacked
            for row_together, row_alone in zip(together["acc_matrix"], alone["acc_matrix"]):
                assert row_together == pytest.approx(row_alone, abs=0.011), (variant, seed)


def test_imbalanced_seeds_stack_apart_not_one_by_one(tiny, tmp_path, capsys):
    # Imbalanced Permuted MNIST draws each seed's class sizes: its seeds cannot share a stack, but
    # each seed's runs still can (a stack of 4 mixing two seeds used to train all four alone).
    argv = ["grid", "--runs", str(tmp_path / "runs"), "--summaries", str(tmp_path / "sum"),
            "--strengths", str(tiny / "sum" / "strengths.json"), "--variants", "finetune,si",
            "--seeds", "0-1", *TINY, "--benchmarks", "imbalanced-permuted-mnist", "--cohort", "4"]
    assert reproduce.main(argv) == 0
    assert "one at a time" not in capsys.readouterr().out
    runs = sorted((tmp_path / "runs").rglob("metrics.json"))
    assert len(runs) == 4
    for path in runs:
        assert json.loads(path.read_text())["timings"]["cohort_runs"] == 2, path


def test_runs_recorded_in_summaries_are_not_redone(tiny, tmp_path, capsys):
    # Run directories elsewhere (another machine); the committed summaries are the record.
    capsys.readouterr()
    assert reproduce.main(["grid", "--runs", str(tmp_path / "elsewhere"), "--summaries",
                           str(tiny / "sum"), "--variants", ",".join(VARIANTS), "--seeds", "0-1",
                           *TINY]) == 0
    assert "0 trained (0 resumed), 8 already finished" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()


def test_variant_groups_and_settings():
    assert reproduce._variants("paper") == list(naming.VARIANTS)
    # Without --variants a grid is the one the report holds, per benchmark.
    assert naming.grid_variants("split-mnist") == naming.VARIANT_GROUPS["all"]
    permuted = naming.grid_variants("permuted-mnist")
    assert "si@authors" in permuted and "ewc@authors" not in permuted and len(permuted) == 14
    assert naming.grid_variants("permuted-mnist", ["dhp"]) == ("dhp",)
    ablation = reproduce._variants("ablation")
    assert "dhp@linear" in ablation and "finetune@authors" in ablation and len(ablation) == 10
    assert naming.variant_settings("dhp+si@linear") == {"method": "si", "dhp": True,
                                                           "head_init": "linear"}
    assert naming.variant_settings("ewc") == {"method": "ewc", "dhp": False, "head_init": None}
    assert naming.variant_name("finetune", False, "authors") == "finetune@authors"
    assert naming.variant_name("finetune", True, "authors") == "dhp"
    # Records from before head_init existed were trained with nn.Linear's init.
    assert naming.training_variant({"method": "si", "dhp": True}) == "dhp+si@linear"
    with pytest.raises(argparse.ArgumentTypeError):
        reproduce._variants("dhp,nonsense")


def test_dhp_strength_runs_at_the_dhp_network_search_and_keeps_its_name(tmp_path):
    r"""``~dhp-strength`` (not a training setting) trains DHP+X at the strength of the search on
    the DHP network, is refused without that search or without a regulariser, and its name
    survives the summary's migration (which recomputes the rest from the config)."""
    from reproduction import records

    strengths = tmp_path / "strengths.json"
    strengths.write_text(json.dumps({"split-mnist": {"si": {"si_c": 0.1}},
                                     "split-mnist+dhp": {"si": {"si_c": 0.001}}}))
    args = reproduce.parse_arguments(["grid", "--benchmarks", "split-mnist", "--seeds", "0",
                                      "--variants", "dhp+si,dhp+si~dhp-strength,dhp+si~eta-bound",
                                      "--strengths", str(strengths), "--jobs", "1",
                                      "--runs", str(tmp_path / "runs")])
    jobs = {job[1].parent.name: job[0] for job in grid_jobs(args)}
    assert jobs["dhp+si"].si_c == 0.1 and jobs["dhp+si~eta-bound"].si_c == 0.1
    assert jobs["dhp+si~dhp-strength"].si_c == 0.001
    assert jobs["dhp+si~dhp-strength"].eta_bound is False  # otherwise the paper's settings
    strengths.write_text(json.dumps({"split-mnist": {"si": {"si_c": 0.1}}}))
    with pytest.raises(ValueError, match="search --dhp"):
        grid_jobs(args)
    for name in ("dhp~dhp-strength", "si~dhp-strength"):
        with pytest.raises(argparse.ArgumentTypeError):
            reproduce._variants(name)
    training = {"method": "si", "dhp": True, "head_init": "authors", "eta_bound": False}
    record = {"kind": naming.SUMMARY_KIND, "variant": "dhp+si~dhp-strength",
              "config": {"training": training}, "metrics": None}
    assert records.migrate_summary(record)["variant"] == "dhp+si~dhp-strength"
    assert records.migrate_summary({**record, "variant": "dhp+si"})["variant"] == "dhp+si"


def test_the_trace_report_takes_in_every_regulariser_run_with_an_intervention():
    from reproduction import trace_study

    pairs = trace_study._pairs({"dhp+ewc~eta-bound": {}, "dhp+si~dhp-strength": {},
                                "dhp+mas": {}, "ewc~fixed-perms": {}})
    assert pairs == [*naming.TRACE_PAIRS, ("ewc", "dhp+ewc")]


def test_findings_name_the_diverged_dhp_runs_and_their_trace():
    from reproduction.report import _divergences

    def record(dhp, seed, diverged=None):
        return {"role": "grid", "benchmark": "b", "protocol": "paper", "dhp": dhp, "seed": seed,
                "variant": "dhp" if dhp else "finetune", "diverged": diverged,
                "metrics": None if diverged else {"avg_acc": [0.5]}}
    records = [record(False, 0), record(False, 1), record(True, 0),
               record(True, 1, {"error": "training diverged in task 3 epoch 2 ...",
                                "last_good_plastic_heads": [{"eta": -0.02, "max_abs_hebb": 300.0}]}),
               record(True, 2, {"error": "--si-c 1 is too strong for SGD at --lr 0.01 ...",
                                "last_good_plastic_heads": [{"eta": 0.4, "max_abs_hebb": 2.0}]})]
    text = _divergences(records, "b", "paper")
    assert "2 DHP run(s) stopped without an accuracy" in text
    # Each named under its own cause: NaN after η left [0, 1], or the stability check's refusal.
    non_finite, unstable = text.split("Non-finite: ")[1].split("Refused by the stability check")
    assert "DHP seed 1 (η -0.02, max abs(Hebb) 300)" in non_finite and "seed 2" not in non_finite
    assert "DHP seed 2 (η 0.4, max abs(Hebb) 2)" in unstable
    assert "None of the 2 plain-head runs here stopped" in text
    assert _divergences(records[:3], "b", "paper") == ""


def test_sign_test_counts_signs_and_gives_the_exact_two_sided_p():
    from reproduction.stats import sign_test

    assert sign_test([-0.1] * 17 + [0.2] * 2) == (17, 19, pytest.approx(2 * 191 / 2 ** 19))
    assert sign_test([-0.1] * 5) == (5, 5, pytest.approx(0.0625))  # 5 of 5 seeds: p = 1/16
    assert sign_test([0.1, -0.1, 0.0]) == (1, 2, 1.0)  # a zero difference is no sign
    assert sign_test([]) == (0, 0, 1.0)


def test_t_distribution_against_published_values():
    from reproduction.stats import t_quantile, t_two_sided_p

    # Student's t tables: t(0.975; 4) = 2.7764, t(0.975; 9) = 2.2622; P(|T1| > 1) = 0.5 exactly
    # (Cauchy); P(|T10| > 2) = 0.07339.
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-5)
    assert t_two_sided_p(2.776445, 4) == pytest.approx(0.05, abs=1e-6)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert t_two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)
    assert t_two_sided_p(0.0, 4) == pytest.approx(1.0)


def test_f_distribution_and_the_variance_ratio_test_against_known_values():
    from reproduction.stats import f_cdf, variance_ratio_test

    # F(2, 2) degrees of freedom (4, 4): x = 2/3, I_x(2, 2) = 3x² − 2x³ = 20/27 by hand; the
    # table's F(0.95; 4, 4) = 6.3882.
    assert f_cdf(2.0, 4, 4) == pytest.approx(20 / 27, abs=1e-12)
    assert f_cdf(6.3882, 4, 4) == pytest.approx(0.95, abs=1e-5)
    same = variance_ratio_test([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 6.0])
    assert same == {"ratio": pytest.approx(1.0), "p": pytest.approx(1.0)}
    wider = variance_ratio_test([0.0, 2.0, 4.0, 6.0, 8.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert wider["ratio"] == pytest.approx(4.0)
    # P(F(4,4) ≥ 4): x = 0.8, I_x(2, 2) = 0.896 → two-sided p = 2 · 0.104.
    assert wider["p"] == pytest.approx(0.208, abs=1e-9)


def test_the_permutation_section_compares_the_two_protocols_spreads():
    from reproduction.permutations import permutation_section

    def record(variant, seed, final):
        return {"role": "grid", "benchmark": "permuted-mnist", "protocol": "paper",
                "variant": variant, "seed": seed, "metrics": {"avg_acc": [0.85, final]}}

    redrawn = [0.70, 0.74, 0.78, 0.82, 0.86]  # std 6.32 pp
    fixed = [0.70, 0.77, 0.78, 0.79, 0.76]  # seed 0 shared
    records = ([record("si", s, v) for s, v in enumerate(redrawn)]
               + [record("si~fixed-perms", s, v) for s, v in enumerate(fixed)])
    text = "\n".join(permutation_section(records))
    ratio = statistics.variance(redrawn) / statistics.variance(fixed)
    assert f"| SI | 0,1,2,3,4 | 78.00 ± 6.32 (range 70.00–86.00; 0 collapsed) |" in text
    assert f"| {ratio:.2f} |" in text
    assert "Check: seed 0's run in the two protocols (the same settings): accuracies SI equal" in text
    assert permutation_section([record("si", 0, 0.7)]) == []


def test_paired_t_by_hand():
    from reproduction.stats import paired_t

    # diffs 1..5: mean 3, sd √2.5, se √0.5, t = 3/√0.5 = 4.2426 on 4 df -> p = 0.01324
    result = paired_t([1.0, 2.0, 3.0, 4.0, 5.0])
    assert result["mean"] == 3.0 and result["median"] == 3.0 and result["n"] == 5
    assert result["p"] == pytest.approx(0.013236, abs=1e-5)
    half = 2.776445 * 0.5 ** 0.5
    assert result["ci"] == pytest.approx((3 - half, 3 + half), abs=1e-5)
    assert paired_t([0.1]) is None


def test_wilcoxon_signed_rank_exact_against_published_values():
    from reproduction.stats import wilcoxon_signed_rank

    assert wilcoxon_signed_rank([1, 2, 3, 4, 5]) == pytest.approx(0.0625)  # 2 / 2^5
    # Darwin's Zea mays differences (scipy.stats.wilcoxon's documented example): p = 0.04126.
    darwin = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    assert wilcoxon_signed_rank(darwin) == pytest.approx(0.041259765625)
    assert wilcoxon_signed_rank([1, -1, 2, -2]) == pytest.approx(1.0)  # ties, symmetric
    assert wilcoxon_signed_rank([0, 0]) == 1.0


def test_holm_step_down_by_hand():
    from reproduction.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_report_family_corrects_every_verdict_together():
    from reproduction import stats

    family = stats.TestFamily()
    strong, weak = [0.050, 0.051, 0.049, 0.052, 0.050], [0.01, -0.02, 0.03, 0.0, 0.02]
    assert family.adjusted_p(strong) is None  # registering pass
    family.adjusted_p(weak)
    family.close()
    assert len(family) == 2
    assert family.adjusted_p(strong) == pytest.approx(2 * stats.paired_t(strong)["p"])
    assert family.adjusted_p(weak) == pytest.approx(stats.paired_t(weak)["p"])  # largest: ×1
    assert stats.paired_t(weak)["p"] > 0.05


def test_trace_study_verdicts_follow_the_stated_criteria():
    from reproduction.trace_study import _pair_verdict, _recovery_rows

    def run(final, zeroed=None, own=None):
        metrics = None if final is None else {
            "avg_acc": [final], "acc_matrix_trace_zeroed": [[zeroed]],
            "acc_matrix_own_trace": [[own]]}
        return {"metrics": metrics, "diverged": None if metrics else {}}
    plain = {seed: run(0.90) for seed in range(5)}
    # Gap 0.10 each: zeroing wins back 80% (seeds 0-3), 10% (seed 4): 4 of 5 recover -> confirmed.
    dhp = {seed: run(0.80, zeroed=0.88 if seed < 4 else 0.81, own=0.80) for seed in range(5)}
    assert _pair_verdict(_recovery_rows(plain, dhp)).startswith("**confirmed**: of 5")
    # Neither evaluation wins back a quarter anywhere -> refuted.
    dhp = {seed: run(0.80, zeroed=0.81, own=0.79) for seed in range(5)}
    assert _pair_verdict(_recovery_rows(plain, dhp)).startswith("**refuted**")
    # Mixed, and a stopped run left out of the count but named.
    dhp = {0: run(0.80, 0.88, 0.8), 1: run(0.80, 0.81, 0.8), 2: run(None)}
    verdict = _pair_verdict(_recovery_rows(plain, dhp))
    assert verdict.startswith("**partial**: of 2") and "1 stopped run(s)" in verdict
    # No seed where DHP+X ends below X: the hypothesis has nothing to explain.
    assert _pair_verdict(_recovery_rows(plain, {0: run(0.95, 0.9, 0.9)})).startswith("no finished")


def test_a_grid_into_a_fresh_folder_plans_from_the_committed_wall_times(tmp_path, capsys):
    # A grid into an empty --summaries folder prints its plan, with a time estimate taken from
    # the runs the repository ships, and trains nothing under --dry-run.
    committed = REPO / "docs" / "results"
    if not any((committed / "runs" / "split-mnist").glob("*/*/seed*.json")):
        pytest.skip("no committed Split MNIST records")
    assert reproduce.main(["grid", "--benchmarks", "split-mnist,permuted-mnist", "--variants",
                           "finetune,dhp", "--seeds", "0-1", "--summaries", str(tmp_path / "sum"),
                           "--strengths", str(committed / "strengths.json"),
                           "--runs", str(tmp_path / "runs"), "--jobs", "2", "--dry-run"]) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan:")]
    assert [line.split(":")[1] for line in plan] == [" split-mnist", " permuted-mnist",
                                                      " all benchmarks"]
    assert all("4 runs, 0 already done, 0 to resume, 4 to train" in line for line in plan[:2])
    assert "8 runs, 0 already done, 0 to resume, 8 to train" in plan[2]
    one_process, at_jobs = re.findall(r"≈ ([0-9hms]+)", plan[0])
    assert at_jobs != one_process  # halved for two processes

    def seconds(line: str) -> int:  # format_duration's "1h02m", "2m05s" or "45s", read back
        text = re.findall(r"≈ ([0-9hms]+)", line)[0]
        return sum(int(value) * {"h": 3600, "m": 60, "s": 1}[unit]
                   for value, unit in re.findall(r"(\d+)([hms])", text))

    # the sum of the benchmarks' estimates, to the minute format_duration keeps past an hour
    assert seconds(plan[2]) == pytest.approx(seconds(plan[0]) + seconds(plan[1]), abs=120)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sum").exists()


def test_the_grid_time_projects_unmeasured_runs_from_their_variant_then_benchmark():
    import grid_time

    def run(wall, samples, diverged=False):
        return {"wall_s": wall, "timings": {"samples": samples},
                "metrics": None if diverged else {}}

    rows = [("a", "dhp", run(10.0, 100)), ("a", "dhp", run(20.0, 100)), ("a", "dhp", None),
            ("a", "dhp", run(4.0, 30, diverged=True)), ("a", "ewc", run(40.0, 300)),
            ("a", "si", None), ("b", "dhp", None)]
    table = grid_time.projection(rows)
    assert table["a"]["runs"] == 6 and table["a"]["measured"] == 4
    assert table["a"]["measured_wall"] == 74.0  # a diverged run costs the time it took
    # The unmeasured dhp run at its variant's finished runs' mean (15 s), si at the benchmark's
    # (70 / 3 s): a diverged run projects nothing.
    assert table["a"]["wall"] == pytest.approx(74.0 + 15.0 + 70.0 / 3)
    assert table["a"]["samples"] == pytest.approx(530 + 100 + 500 / 3)
    assert table["b"] == {"runs": 1, "measured": 0, "measured_wall": 0.0, "wall": 0.0,
                          "samples": 0.0, "unknown": 1}


def test_the_eta_weighs_each_pending_run_by_its_expected_time_at_this_sittings_speed():
    from reproduction.runs import time_left

    # Runs took 1.5x their recorded peers: a pending 100-s run and a 10-s one are 165 s; one
    # already done (0 s expected) adds nothing; one with no recorded peer takes the mean so far.
    measured = [(150.0, 100.0), (15.0, 10.0)]
    assert time_left([100.0, 10.0, 0.0], measured, processes=1) == "2m45s"
    assert time_left([100.0, 10.0, 0.0], measured, processes=2) == "1m22s"
    assert time_left([None], measured, processes=1) == "1m22s"  # the mean of 150 s and 15 s
    assert time_left([None, None], [(30.0, None)], processes=1) == "1m00s"  # nothing recorded
    assert time_left([100.0], [], processes=1) == "n/a"


def test_the_scripts_train_the_package_of_their_own_checkout(tmp_path):
    # Another checkout (a git worktree pinned at one commit for a long grid) must train its own
    # code and record its own commit, not the code the environment's editable install points at.
    for folder in ("dhp_deploy", "benchmarks"):
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / "dhp_deploy" / "__init__.py"
    init.write_text(init.read_text() + '\nprint("dhp_deploy from", __file__)\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(tmp_path / "benchmarks" / "reproduce.py"),
                             "--help"], capture_output=True, text=True, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert f"dhp_deploy from {init}" in result.stdout  # and runs.git_commit asks its checkout


def test_a_run_is_estimated_from_the_records_most_like_it():
    # The plan's estimate comes from the records most like the run to train: the same device
    # kind, then this host at the grid's threads per run, then the same stacking, then the
    # newest code, then the same number of processes (the code got faster between sittings:
    # averaging every record put the Permuted grid at 1.6× its time).
    from reproduction.estimates import best_records

    machine = {"cpu": "Xeon", "cores": 2, "device": "cpu", "torch_threads": 1}
    here = {"machine": machine, "setting": {"jobs": 2, "cohort": 1}}

    def record(wall, commit, jobs=2, cohort=1, **differs):
        return {"wall_s": wall, "commit": commit, "setting": {"jobs": jobs, "cohort": cohort},
                "machine": {**machine, **differs}}

    ages = {"new": 0, "mid": 1, "old": 2}
    other_host = record(10.0, "new", cpu="EPYC")
    two_threads = record(20.0, "new", torch_threads=2)
    alone = record(30.0, "new", jobs=1)
    old, mid, mid2 = record(90.0, "old"), record(60.0, "mid"), record(40.0, "mid")
    unknown = record(5.0, "not-in-history")
    assert best_records([other_host, two_threads, old, mid, unknown, mid2], here,
                        ages) == [mid, mid2]
    assert best_records([mid, alone, old], here, ages) == [alone]  # newer code, one process
    beside = record(35.0, "new")
    assert best_records([alone, beside, mid], here, ages) == [beside]  # as many processes
    assert best_records([other_host, unknown], here, ages) == [unknown]
    assert best_records([other_host, two_threads], here, ages) == [other_host, two_threads]
    assert best_records([], here, ages) == []
    assert best_records([old, mid], here, {}) == [old, mid]  # off git: this host's, all of them
    before_gpus = {**old, "machine": {k: v for k, v in machine.items() if k != "device"}}
    assert best_records([other_host, before_gpus], here, ages) == [before_gpus]
    on_gpu = record(3.0, "new", device="NVIDIA H100", torch_threads=16, jobs=1)
    assert best_records([on_gpu, other_host], here, ages) == [other_host]  # a CPU run's peer
    gpu = {"machine": {**machine, "device": "NVIDIA H100", "torch_threads": 8},
           "setting": {"jobs": 1, "cohort": 1}}
    assert best_records([mid, on_gpu], gpu, ages) == [on_gpu]  # threads do not matter on a GPU
    stacked = record(0.4, "new", device="NVIDIA H100", jobs=1, cohort=10)
    older_alone = record(3.5, "old", device="NVIDIA H100", jobs=1)
    assert best_records([stacked, older_alone], gpu, ages) == [older_alone]  # a share of 10


def test_the_plan_expects_a_run_to_take_what_its_like_took_here(tmp_path, capsys):
    # A run recorded on this host, in this grid's setting, by this checkout's code, is what the
    # plan expects the next runs of its variant to take.
    from reproduction.records import machine

    args = ["grid", "--variants", "finetune", "--seeds", "0-2", *TINY, "--summaries",
            str(tmp_path / "sum"), "--runs", str(tmp_path / "runs"), "--jobs", "1",
            "--cohort", "1", "--dry-run"]
    config, _, _, summary_path = grid_jobs(reproduce.parse_arguments(args))[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    summary = {"kind": naming.SUMMARY_KIND, "version": naming.SUMMARY_VERSION, "role": "grid",
               "benchmark": config.benchmark, "variant": "finetune", "method": "finetune",
               "dhp": False, "seed": 0, "protocol": naming.protocol_tag(vars(config)),
               "commit": head, "machine": {**machine(), "torch_threads": 1}, "wall_s": 3600.0,
               "setting": {"jobs": 1, "cohort": 1},
               "metrics": {}, "diverged": None, "timings": {},
               "config": {"training": vars(config)}}
    summary_path.parent.mkdir(parents=True)
    summary_path.write_text(json.dumps(summary))
    # Seeds outside the grid, a minute each: from another host, from code not in this
    # checkout's history, beside another grid process, of another variant. None is like the
    # runs to train.
    elsewhere = {**summary, "seed": 5, "wall_s": 60.0,
                 "machine": {**summary["machine"], "cpu": "another CPU"}}
    unknown_code = {**summary, "seed": 6, "wall_s": 60.0, "commit": "0" * 40}
    shared = {**summary, "seed": 7, "wall_s": 60.0, "setting": {"jobs": 2, "cohort": 1}}
    authors = {**summary, "seed": 8, "wall_s": 60.0, "variant": "finetune@authors",
               "config": {"training": {**vars(config), "head_init": "authors"}}}
    for record in (elsewhere, unknown_code, shared, authors):
        path = summary_path.parent.parent / record["variant"] / f"seed{record['seed']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record))
    capsys.readouterr()
    assert reproduce.main(args) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan:")]
    # seed 0 is recorded (its settings are the run's); seeds 1 and 2 are expected to take its
    # hour each at one thread, i.e. two hours.
    assert "3 runs, 1 already done, 0 to resume, 2 to train; ≈ 2h00m" in plan[0]
