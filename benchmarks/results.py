r"""docs/RESULTS.md from run records: the paper's table, curves, DHP's gains, protocol, wall time.

    python benchmarks/results.py --from docs/results --out docs/RESULTS.md     # committed summaries
    python benchmarks/results.py --from runs/reproduce --out /tmp/RESULTS.md   # run directories

``--from`` takes run directories (``dhp-train`` ones: ``config.json`` + ``metrics.json``) or the
small JSON summaries ``benchmarks/reproduce.py`` leaves beside them (``kind: dhp-run-summary``),
found recursively. Every number of the report is computed here from those records; the report
names the records' commits. The output is a pure function of the records (no clock), so
regenerating from unchanged summaries gives the same bytes. Plots go next to the report.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from dhp_deploy.metrics import format_duration
from dhp_deploy.regularizers import STRENGTH_OPTION
from dhp_deploy.run_dir import CONFIG_NAME, METRICS_NAME
from dhp_deploy.train import TrainConfig

SUMMARY_KIND, SUMMARY_VERSION = "dhp-run-summary", 1
SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH = "runs", "search"
DIVERGED_NAME = "diverged.json"  # beside a run that stopped on a non-finite loss (reproduce.py)
REPO = Path(__file__).resolve().parents[1]

# The paper's protocol (docs/DESIGN.md §1) is TrainConfig's defaults; permuted-MNIST epochs are
# not stated: 10, as for split.
PAPER_PROTOCOL = {name: getattr(TrainConfig(), name)
                  for name in ("epochs", "batch_size", "lr", "hidden", "num_tasks", "train_limit",
                               "test_limit", "fisher_samples", "val_fraction")}
# Short names of the protocol options in run-directory names (``e2`` = 2 epochs per task).
PROTOCOL_TAGS = {"epochs": "e", "batch_size": "b", "lr": "lr", "hidden": "h", "num_tasks": "t",
                 "train_limit": "n", "test_limit": "m", "fisher_samples": "f", "val_fraction": "v"}
BASE_METHODS = ("finetune", "ewc", "online-ewc", "si", "mas")
VARIANTS = tuple(name for m in BASE_METHODS
                 for name in (m, "dhp" if m == "finetune" else f"dhp+{m}"))
# The ablation that separates the two things "DHP" changes at once: each paper variant with the
# other head's θ init (``@authors`` on a plain head, ``@linear`` on a DHP head).
ABLATION_VARIANTS = tuple(f"{v}@{'linear' if v.startswith('dhp') else 'authors'}"
                          for v in VARIANTS)
INIT_DISPLAY = {"authors": "authors' init", "linear": "nn.Linear init"}
DISPLAY = {"finetune": "Finetune", "ewc": "EWC", "online-ewc": "Online EWC", "si": "SI",
           "mas": "MAS"}
BENCHMARK_ORDER = ("permuted-mnist", "imbalanced-permuted-mnist", "split-mnist",
                   "split-fashion-mnist")


# --------------------------------------------------------------------------- naming


def variant_name(method: str, dhp: bool, head_init: str | None = None) -> str:
    r"""``("ewc", True)`` → ``"dhp+ewc"``; ``("finetune", True)`` → ``"dhp"`` (the paper's);
    a head init other than the paper's for that head is a suffix: ``"dhp@linear"``."""
    from dhp_deploy.network import default_head_init

    name = (("dhp" if method == "finetune" else f"dhp+{method}") if dhp else method)
    if head_init is not None and head_init != default_head_init(dhp):
        name += f"@{head_init}"
    return name


def training_variant(training: dict) -> str:
    r"""The variant of a run's ``training`` config (runs from before ``head_init``: linear)."""
    return variant_name(training["method"], training["dhp"], training.get("head_init", "linear"))


def display_name(variant: str) -> str:
    variant, _, init = variant.partition("@")
    suffix = f" ({INIT_DISPLAY[init]})" if init else ""
    if variant == "dhp":
        return "DHP" + suffix
    if variant.startswith("dhp+"):
        return "DHP+" + DISPLAY[variant[4:]] + suffix
    return DISPLAY[variant] + suffix


def protocol_tag(training: dict) -> str:
    r"""``"paper"`` for the paper's protocol, else what differs (``"e2-n500"``)."""
    parts = []
    for name, short in PROTOCOL_TAGS.items():
        value = training.get(name)
        if isinstance(value, list):
            value = tuple(value)
        if value == PAPER_PROTOCOL[name]:
            continue
        if name == "hidden":
            value = "x".join(map(str, value))
        parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
    return "-".join(parts) or "paper"


def grid_protocol(training: dict) -> str:
    r"""The protocol name of the grid a run's settings serve (a search's, without its hold-out)."""
    return protocol_tag({**training, "val_fraction": 0.0})


def strengths_key(benchmark: str, protocol: str) -> str:
    r"""The key of strengths.json for grids of ``benchmark`` under ``protocol``."""
    return benchmark if protocol == "paper" else f"{benchmark}@{protocol}"


def train_command(training: dict) -> str:
    r"""The ``dhp-train`` line that trains the run of ``training`` (a TrainConfig dict) alone."""
    # The defaults dhp-train would apply to this benchmark, method and head.
    default = TrainConfig(benchmark=training["benchmark"], method=training["method"],
                          dhp=training["dhp"])
    training = {"head_init": "linear", **training}  # runs from before the option: linear
    words = ["dhp-train", "--benchmark", training["benchmark"], "--method", training["method"],
             "--dhp" if training["dhp"] else "--no-dhp"]
    for name, value in training.items():
        if name in ("benchmark", "method", "dhp", "download") or not hasattr(default, name):
            continue
        if isinstance(value, list):
            value = tuple(value)
        if value == getattr(default, name):
            continue
        option = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(option if value else "")
        elif name == "hidden":
            words += [option, ",".join(map(str, value))]
        else:
            words += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(word for word in words if word) + " --out RUN_DIR"


# --------------------------------------------------------------------------- records


def machine() -> dict:
    r"""CPU model, logical cores, torch version and threads of this host."""
    import os
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def summarize_run(run_dir, command: str | None = None) -> dict:
    r"""The JSON summary of a finished ``dhp-train`` run directory (config, seed, commit, metrics).

    A run that diverged (``diverged.json``, no ``metrics.json``) gets ``metrics: null`` and
    ``diverged: {error, ...}``: a result the report counts, with no accuracy.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    diverged = None
    if (run_dir / METRICS_NAME).exists():
        metrics = json.loads((run_dir / METRICS_NAME).read_text())
    else:
        diverged = json.loads((run_dir / DIVERGED_NAME).read_text())
        from dhp_deploy.run_dir import load_checkpoint

        progress = load_checkpoint(run_dir)["metrics"]
        metrics = {"acc_matrix": progress["acc_matrix"], "timings": progress["timings"]}
    provenance_path = run_dir / "provenance.json"
    provenance = (json.loads(provenance_path.read_text()) if provenance_path.exists()
                  else {"role": "grid", "sessions": []})
    training = config["training"]
    val_matrix = _val_matrix(run_dir) if training.get("val_fraction") and not diverged else None
    timings = metrics["timings"]
    first = provenance["sessions"][0] if provenance["sessions"] else {}
    last_file = run_dir / (METRICS_NAME if diverged is None else DIVERGED_NAME)
    finished = datetime.fromtimestamp(last_file.stat().st_mtime, timezone.utc)
    return {
        "kind": SUMMARY_KIND,
        "version": SUMMARY_VERSION,
        "role": provenance["role"],
        "benchmark": training["benchmark"],
        "variant": training_variant(training),
        "method": training["method"],
        "dhp": training["dhp"],
        "seed": training["seed"],
        "protocol": protocol_tag(training),
        "commit": first.get("commit"),
        "dirty": first.get("dirty", []),
        "sessions": provenance["sessions"],
        "finished_at": finished.isoformat(timespec="seconds"),
        "run_dir": _relative(run_dir),
        "command": command or train_command(training),
        "machine": machine(),
        "diverged": diverged,
        "metrics": None if diverged else {
            "acc_matrix": metrics["acc_matrix"], "avg_acc": metrics["avg_acc"],
            "acc": metrics["acc"], "bwt": metrics["bwt"], "forgetting": metrics["forgetting"],
            "val_acc_matrix": val_matrix,
            "val_avg_acc": _averages(val_matrix) if val_matrix else None,
            "plasticity": metrics.get("plasticity"),
        },
        "timings": timings,
        "wall_s": timings["train_s"] + timings["consolidate_s"] + timings["evaluate_s"],
        "config": config,
    }


def _val_matrix(run_dir: Path):
    # metrics.json keeps test rows only; the validation rows live in the checkpoint's progress.
    from dhp_deploy.run_dir import load_checkpoint

    return load_checkpoint(run_dir)["metrics"].get("val_acc_matrix") or None


def _averages(matrix) -> list[float]:
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_summary(path, summary: dict) -> None:
    from dhp_deploy.run_dir import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, summary)


def load_records(roots) -> list[dict]:
    r"""Summaries found under ``roots``: summary JSON files, and run directories summarised now."""
    records, seen = [], set()
    for root in map(Path, roots):
        for path in sorted(root.rglob("*.json")):
            if path.name in (METRICS_NAME, DIVERGED_NAME):
                if not (path.parent / CONFIG_NAME).exists():
                    continue
                record = summarize_run(path.parent)
            elif path.name in (CONFIG_NAME, "provenance.json"):
                continue
            else:
                try:
                    record = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                if not isinstance(record, dict) or record.get("kind") != SUMMARY_KIND:
                    continue
                record["variant"] = training_variant(record["config"]["training"])
            key = (record["role"], record["benchmark"], record["protocol"], record["variant"],
                   record["seed"], json.dumps(record["config"]["regularizer"], sort_keys=True))
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


# --------------------------------------------------------------------------- statistics


def mean_std(values) -> tuple[float, float | None]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(values, scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std = mean_std(v * scale for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def grouped(records) -> dict:
    r"""``{(benchmark, protocol): {variant: [records sorted by seed]}}`` of the grid's runs."""
    groups = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["role"] == "grid" and record["metrics"] is not None:
            groups[(record["benchmark"], record["protocol"])][record["variant"]].append(record)
    for variants in groups.values():
        for runs in variants.values():
            runs.sort(key=lambda r: r["seed"])
    order = {name: i for i, name in enumerate(BENCHMARK_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1])))


def diverged_seeds(records) -> dict:
    r"""``{(benchmark, protocol, variant): [seeds]}`` of the grid's runs that diverged."""
    seeds = defaultdict(list)
    for r in records:
        if r["role"] == "grid" and r["metrics"] is None:
            seeds[(r["benchmark"], r["protocol"], r["variant"])].append(r["seed"])
    return {key: sorted(value) for key, value in seeds.items()}


def dhp_gain(base_runs, dhp_runs) -> tuple[list[float], list[int]]:
    r"""Per common seed, final average accuracy of DHP+X minus X (paired by seed)."""
    base = {r["seed"]: r["metrics"]["avg_acc"][-1] for r in base_runs}
    dhp = {r["seed"]: r["metrics"]["avg_acc"][-1] for r in dhp_runs}
    seeds = sorted(set(base) & set(dhp))
    return [dhp[s] - base[s] for s in seeds], seeds


def paired(base_runs, other_runs) -> tuple[list[float], list[int]]:
    r"""Per common seed, final average accuracy of ``other`` minus ``base``."""
    return dhp_gain(base_runs, other_runs)


MIN_SEEDS_FOR_VERDICT = 3  # below this a standard error says nothing


def verdict(diffs) -> str:
    r"""``"+1.23 ± 0.45 pp, n=5, beyond 2 SE"``: mean ± std of paired differences and whether
    the mean exceeds two standard errors (2·std/√n)."""
    if not diffs:
        return "—"
    mean, std = mean_std(diffs)
    if std is None:
        return f"{100 * mean:+.2f} pp, n=1"
    if len(diffs) < MIN_SEEDS_FOR_VERDICT:
        return f"{100 * mean:+.2f} ± {100 * std:.2f} pp, n={len(diffs)}, too few seeds"
    return (f"{100 * mean:+.2f} ± {100 * std:.2f} pp, n={len(diffs)}, "
            f"{'**beyond 2 SE**' if is_beyond_noise(diffs) else 'within noise'}")


def is_beyond_noise(diffs) -> bool:
    if len(diffs) < MIN_SEEDS_FOR_VERDICT:
        return False
    mean, std = mean_std(diffs)
    return abs(mean) > 2 * std / len(diffs) ** 0.5


# --------------------------------------------------------------------------- plots


def plot_curves(variants: dict, title: str, path: Path) -> None:
    r"""Average accuracy after each task, mean ± std over seeds: plain heads solid, DHP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    colors = dict(zip(BASE_METHODS, ("tab:gray", "tab:blue", "tab:green", "tab:orange",
                                     "tab:purple")))
    for variant in VARIANTS:
        runs = variants.get(variant)
        if not runs:
            continue
        base = "finetune" if variant == "dhp" else variant.removeprefix("dhp+")
        curves = [r["metrics"]["avg_acc"] for r in runs]
        length = min(map(len, curves))
        tasks = list(range(1, length + 1))
        means = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
        axes.plot(tasks, means, color=colors[base], linestyle="--" if "dhp" in variant else "-",
                  marker="o", markersize=3, label=f"{display_name(variant)} (n={len(runs)})")
        if len(runs) > 1:
            stds = [100 * statistics.stdev(c[i] for c in curves) for i in range(length)]
            axes.fill_between(tasks, [m - s for m, s in zip(means, stds)],
                              [m + s for m, s in zip(means, stds)], color=colors[base], alpha=0.12)
    longest = max((len(r["metrics"]["avg_acc"]) for runs in variants.values() for r in runs),
                  default=1)
    axes.set_xticks(range(1, longest + 1))
    axes.set(xlabel="tasks learned", ylabel="average test accuracy over tasks seen (%)",
             title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: the same records give the same bytes.
    figure.savefig(path, format="png", dpi=90, metadata={"Software": None})


# --------------------------------------------------------------------------- the report


CHOICES = """\
- **Epochs on (Imbalanced) Permuted MNIST.** The paper states 10 epochs per task for Split MNIST
  only; the `paper` protocol uses 10 for the permuted benchmarks too. Where a table's protocol is
  not `paper` (e.g. `e1`: 1 epoch per task), that was forced by this machine's time budget: it
  is said at the table.
- **Imbalance scheme.** The paper gives none. Ours (`dhp_deploy/benchmarks.py`): for each task a
  seeded order of the 10 classes; the class at rank r keeps `0.1 ** (r / 9)` of its training
  examples (1.0 down to 0.1, imbalance ratio 10); validation and test sets stay balanced.
- **Permutations.** Task 1 is the identity (as in the authors' figure), task t ≥ 2 a seeded
  `randperm(784)`; the seed also seeds the weights and batch order, so seed k is one sample of
  everything.
- **Heads.** Split MNIST: multi-headed (one 2-way head per task, cross-entropy and argmax within
  the task's classes, task-incremental). Permuted: one shared 10-way head.
- **Strengths.** Chosen once per regulariser on the plain-head variant and used unchanged for
  DHP+X, so DHP's gain measures the head, not a retuned regulariser. Online EWC's decay γ is not
  searched (1.0, the library default: the Fisher is summed, the anchor is the last task's
  weights). Fisher / MAS importances are estimated on `fisher_samples` training samples per
  task (1000 unless the protocol table says otherwise), from per-sample gradients.
- **Validation.** The search holds out 10% of every task's training set and ranks strengths by
  the final average accuracy on those held-out sets; test data is never used to choose. The grid
  then trains on the full training sets (no hold-out). A search runs under the protocol of the
  grid it serves (Permuted MNIST's at 1 epoch/task when the grid is `e1`). A benchmark without a
  search of its own borrows the closest searched one's strengths (Imbalanced Permuted ← Permuted;
  Split MNIST's do not transfer: its EWC λ = 10⁴ diverges on Permuted MNIST).
- **Seeds.** The search uses seed 1000, the grid seeds 0, 1, ...; "±" is the sample standard
  deviation over seeds; DHP gains are paired by seed.
"""


def _seed_list(seeds) -> str:
    return ", ".join(map(str, seeds)) if seeds else "none"


def _pct(value, digits=2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def benchmark_section(key, variants: dict, plot_name: str, diverged: dict) -> list[str]:
    benchmark, protocol = key
    any_run = next(iter(variants.values()))[0]
    training = any_run["config"]["training"]
    num_tasks = len(any_run["metrics"]["avg_acc"])
    lines = [f"### {benchmark} — protocol `{protocol}`", ""]
    if protocol != "paper":
        lines += [f"**Reduced protocol** (`{protocol}`): {_protocol_line(training)} — not the "
                  f"paper's settings; compare rows with one another, not with the paper.", ""]
    lines += [f"{num_tasks} tasks; final average accuracy = mean test accuracy over all "
              f"{num_tasks} tasks after the last one (%).", "",
              "| Method | seeds | final avg acc (%) | BWT (pp) | forgetting (pp) | DHP gain (pp) "
              "| wall / run |",
              "|---|---|---|---|---|---|---|"]
    for variant in VARIANTS + ABLATION_VARIANTS:
        runs = variants.get(variant)
        lost = diverged.get((benchmark, protocol, variant), [])
        note = f" (diverged: seed {', '.join(map(str, lost))})" if lost else ""
        if not runs and variant in ABLATION_VARIANTS and not lost:
            continue  # the ablation rows appear where they were run
        if not runs:
            lines.append(f"| {display_name(variant)} | —{note} | "
                         f"{'diverged' if lost else 'not run yet'} | | | | |")
            continue
        gain = ""
        if "dhp" in variant and "@" not in variant:
            base = "finetune" if variant == "dhp" else variant[4:]
            diffs, seeds = dhp_gain(variants.get(base, []), runs)
            gain = f"{pm(diffs)} (n={len(seeds)})" if seeds else "no base run"
        lines.append(
            f"| {display_name(variant)} | {','.join(str(r['seed']) for r in runs)}{note} "
            f"| {pm(r['metrics']['avg_acc'][-1] for r in runs)} "
            f"| {pm(r['metrics']['bwt'] for r in runs)} "
            f"| {pm(r['metrics']['forgetting'] for r in runs)} | {gain} "
            f"| {format_duration(statistics.fmean(r['wall_s'] for r in runs))} |")
    lines += ["", f"![average accuracy vs tasks, {benchmark} {protocol}]({plot_name})", ""]
    return lines


def _protocol_line(training: dict) -> str:
    epochs = training["epochs"]
    parts = [f"{epochs} epoch{'s' if epochs != 1 else ''}/task", f"batch {training['batch_size']}",
             f"SGD lr {training['lr']:g}" + (f" momentum {training['momentum']:g}"
                                              if training.get("momentum") else ""),
             f"hidden {'-'.join(map(str, training['hidden']))}"]
    for name, label in (("num_tasks", "tasks"), ("train_limit", "train examples/task"),
                        ("test_limit", "test examples/task")):
        if training.get(name) is not None:
            parts.append(f"{training[name]} {label}")
    return ", ".join(parts)


def headline(key, variants: dict) -> str:
    r"""One line per benchmark: the best row, and each DHP gain with a noise verdict."""
    benchmark, protocol = key
    means = {v: statistics.fmean(r["metrics"]["avg_acc"][-1] for r in runs)
             for v, runs in variants.items()}
    best = max(means, key=means.get)
    parts = []
    for method in BASE_METHODS:
        diffs, seeds = dhp_gain(variants.get(method, []),
                                variants.get(variant_name(method, True), []))
        if not seeds:
            continue
        mean, std = mean_std(diffs)
        if std is None:
            verdict = "one seed"
        elif abs(mean) > 2 * std / len(diffs) ** 0.5:
            verdict = "beyond 2 standard errors"
        else:
            verdict = "within seed noise"
        parts.append(f"{DISPLAY[method]} {100 * mean:+.2f} pp ({verdict}, n={len(seeds)})")
    seeds = sorted({r["seed"] for runs in variants.values() for r in runs})
    return (f"- **{benchmark}** (`{protocol}`, seeds {_seed_list(seeds)}): best "
            f"{display_name(best)} {pm(r['metrics']['avg_acc'][-1] for r in variants[best])}%. "
            f"DHP+X − X as the paper compares them (each head with its own θ init; what that "
            f"init explains is under \"What we found\"): "
            + ("; ".join(parts) or "no pairs yet") + ".")


def gains_section(groups: dict) -> list[str]:
    lines = ["## DHP's gain over each base method", "",
             "Final average accuracy of DHP+X minus X, in percentage points, mean ± std over "
             "seeds paired by seed (n = seeds with both runs).", "",
             "| Benchmark (protocol) | " + " | ".join(DISPLAY[m] for m in BASE_METHODS) + " |",
             "|---|" + "---|" * len(BASE_METHODS)]
    for (benchmark, protocol), variants in groups.items():
        cells = []
        for method in BASE_METHODS:
            diffs, seeds = dhp_gain(variants.get(method, []),
                                    variants.get(variant_name(method, True), []))
            cells.append(f"{pm(diffs)} (n={len(seeds)})" if seeds else "—")
        lines.append(f"| {benchmark} (`{protocol}`) | " + " | ".join(cells) + " |")
    return lines + [""]


ABLATION_INTRO = """\
The paper's comparison changes two things at once. The authors' code initialises the DHP head's
slow weights θ with `kaiming_uniform_(w, a=√5)` on an `(in, out)`-shaped tensor, so PyTorch's
fan-in is the number of *classes*: the bound is 1/√10 = 0.316, five times `nn.Linear`'s 1/√256 =
0.0625 that a standard baseline head gets. Each paper variant is therefore also run with the other
head's init (`dhp-train --head-init`), same seeds, same strengths: the paired differences split
"DHP+X vs X" into (a) the initialisation (plain head, authors' init − plain head, `nn.Linear`
init) and (b) plasticity (DHP head − plain head, both with the authors' init; and both with
`nn.Linear`'s). With the same seed, a plain and a DHP network with the same init start from the
same trunk and the same θ, so (b) isolates α, η and the Hebbian trace. (a) + (b) = the paper's
comparison exactly, seed by seed.
"""


def ablation_section(groups: dict) -> list[str]:
    lines = ["## What causes DHP's gain: initialisation or plasticity", "", ABLATION_INTRO]
    for (benchmark, protocol), variants in groups.items():
        if not any(v in variants for v in ABLATION_VARIANTS):
            continue
        lines += [f"### {benchmark} — protocol `{protocol}`", "",
                  "Final average accuracy (%), mean ± std over seeds:", "",
                  "| Base method X | plain head, nn.Linear init (X) | plain head, authors' init "
                  "| DHP head, nn.Linear init | DHP head, authors' init (DHP+X) |",
                  "|---|---|---|---|---|"]
        rows = []
        for method in BASE_METHODS:
            names = (method, f"{method}@authors", f"{variant_name(method, True)}@linear",
                     variant_name(method, True))
            if not any(variants.get(n) for n in names):
                continue
            cells = [pm(r["metrics"]["avg_acc"][-1] for r in variants.get(n, [])) for n in names]
            lines.append(f"| {DISPLAY[method]} | " + " | ".join(
                f"{c} (n={len(variants.get(n, []))})" if variants.get(n) else "—"
                for c, n in zip(cells, names)) + " |")
            rows.append(names)
        lines += ["", "Paired differences (pp), mean ± std over seeds; **beyond 2 SE** = the mean "
                  "exceeds two standard errors:", "",
                  "| X | paper's comparison: DHP+X − X | (a) init: plain authors' − plain "
                  "nn.Linear | (b) plasticity, authors' init | plasticity, nn.Linear init |",
                  "|---|---|---|---|---|"]
        for plain, plain_authors, dhp_linear, dhp in rows:
            total = paired(variants.get(plain, []), variants.get(dhp, []))[0]
            init = paired(variants.get(plain, []), variants.get(plain_authors, []))[0]
            plastic = paired(variants.get(plain_authors, []), variants.get(dhp, []))[0]
            plastic_linear = paired(variants.get(plain, []), variants.get(dhp_linear, []))[0]
            lines.append(f"| {DISPLAY[plain]} | {verdict(total)} | {verdict(init)} | "
                         f"{verdict(plastic)} | {verdict(plastic_linear)} |")
        lines += [""] + plasticity_table(variants) + [""]
    return lines


def findings_section(groups: dict) -> list[str]:
    r"""One generated paragraph per benchmark whose paper comparison and ablation are recorded."""
    found = []
    for (benchmark, protocol), variants in groups.items():
        runs = {name: variants.get(name, []) for name in
                ("finetune", "finetune@authors", "dhp", "dhp@linear")}
        total = paired(runs["finetune"], runs["dhp"])[0]
        if not total:
            continue
        found.append(_finding(benchmark, protocol, total,
                              paired(runs["finetune"], runs["finetune@authors"])[0],
                              paired(runs["finetune@authors"], runs["dhp"])[0],
                              paired(runs["finetune"], runs["dhp@linear"])[0]))
    if not found:
        return []
    return ["## What we found", "", FINDINGS_INTRO, ""] + found + ["", FINDINGS_OUTRO, ""]


FINDINGS_INTRO = """\
DHP-Softmax vs a finetuned plain network, as the paper compares them (DHP head with the
authors' θ init, plain head with `nn.Linear`'s), split into the part the initialisation explains
and the part plasticity adds (paired by seed; the decomposition and every DHP+X are in "What
causes DHP's gain" below):"""

FINDINGS_OUTRO = """\
Where the initialisation carries the difference, a reader should credit the paper's gain to the
wider θ init of the authors' code (bound 1/√classes instead of 1/√inputs), which a plain head
enjoys just as much; the Hebbian trace itself, whose term stays a few percent of θ (table of
learned α, η below), adds nothing measurable. Why the wider head init forgets less is not
established here; the numbers are what was measured."""


def _finding(benchmark, protocol, total, init, plastic, plastic_linear) -> str:
    def say(diffs):
        if not diffs:
            return "not measured yet"
        mean = 100 * mean_std(diffs)[0]
        if len(diffs) < MIN_SEEDS_FOR_VERDICT:
            return f"{mean:+.2f} pp (n={len(diffs)}, too few seeds to judge)"
        return f"{mean:+.2f} pp ({'beyond' if is_beyond_noise(diffs) else 'within'} seed noise)"

    return (f"- **{benchmark}** (`{protocol}`): DHP vs Finetune as the paper compares them, "
            f"{say(total)} = (a) initialisation {say(init)} + (b) plasticity {say(plastic)}; "
            f"with `nn.Linear`'s init on both heads, plasticity gives {say(plastic_linear)}. "
            f"In plain words: {_cause(total, init, plastic)}.")


def _cause(total, init, plastic) -> str:
    r"""Which part of the paper's comparison carries the gain, from the paired differences."""
    if not (total and init and plastic):
        return "not measured under this protocol (runs with the authors' init are missing)"
    if min(len(total), len(init), len(plastic)) < MIN_SEEDS_FOR_VERDICT:
        return "too few seeds for a verdict yet"
    mean = {name: mean_std(d)[0] for name, d in (("total", total), ("init", init),
                                                  ("plastic", plastic))}
    real = {name: is_beyond_noise(d) for name, d in (("total", total), ("init", init),
                                                     ("plastic", plastic))}
    if not real["init"] and not real["plastic"]:
        return "neither the initialisation nor plasticity moves the result beyond seed noise"
    if real["init"] and abs(mean["plastic"]) < 0.2 * abs(mean["init"]):
        share = 100 * mean["init"] / mean["total"] if mean["total"] else float("nan")
        return (f"the initialisation carries the difference ({share:.0f}% of it): a plain head "
                f"with the authors' init does as well as the DHP head, and plasticity's own part "
                f"is {'small but consistent' if real['plastic'] else 'within seed noise'}")
    if real["plastic"] and not real["init"]:
        effect = "a gain" if mean["plastic"] > 0 else "a loss"
        return f"plasticity carries the difference ({effect}), not the initialisation"
    return "both parts matter, with the signs shown"


def plasticity_table(variants: dict) -> list[str]:
    r"""How much plasticity the trained DHP heads use (runs recorded with the statistics)."""
    lines = ["How much plasticity the trained DHP heads use at the end of training (mean over "
             "seeds): mean |α|, η, and the plastic term's size relative to the slow weights, "
             "‖α ⊙ Hebb‖ / ‖θ‖ (Frobenius norms). α starts at 0.01·U[0,1) (mean 0.005), η at "
             "0.01.", "", "| DHP variant | runs | mean abs(α) | η | ‖α⊙Hebb‖/‖θ‖ |",
             "|---|---|---|---|---|"]
    for variant in VARIANTS + ABLATION_VARIANTS:
        stats = [r["metrics"].get("plasticity") for r in variants.get(variant, [])
                 if r["metrics"].get("plasticity")]
        if not variant.startswith("dhp") or not stats:
            continue
        cells = [f"{statistics.fmean(s[key] for s in stats):.4g}"
                 for key in ("mean_abs_alpha", "eta", "plastic_to_slow")]
        lines.append(f"| {display_name(variant)} | {len(stats)} | " + " | ".join(cells) + " |")
    return lines


def search_section(records, strengths: dict) -> list[str]:
    trials = [r for r in records if r["role"] == "search"]
    lines = ["## Regularisation strengths (validation search)", ""]
    if not trials and not strengths:
        return lines + ["No search recorded yet: runs used the library defaults.", ""]
    lines += ["Each regulariser with a plain head, one seed, 10% of every task's training set "
              "held out; score = final average accuracy on the held-out **validation** sets "
              "(never test). The best value (bold) is used for X and DHP+X. A best value at "
              "the edge of the range is followed by a decade past it (at most twice). One seed "
              "only: differences of a few tenths of a point between the top values are within "
              "seed-to-seed noise (compare the ± of the grid), so the choice among them is close "
              "to arbitrary, and the search's cost went to the grid's seeds instead.", "",
              "| Benchmark (protocol, seed) | Method | option | value → val avg acc (%) |",
              "|---|---|---|---|"]
    by_key = defaultdict(list)
    for r in trials:
        by_key[(r["benchmark"], r["protocol"], r["seed"], r["method"])].append(r)
    def order(item):
        benchmark, protocol, seed, method = item[0]
        return (BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else 99,
                protocol, seed, BASE_METHODS.index(method))

    for (benchmark, protocol, seed, method), runs in sorted(by_key.items(), key=order):
        option = STRENGTH_OPTION[method]
        key = strengths_key(benchmark, grid_protocol(runs[0]["config"]["training"]))
        chosen = strengths.get(key, {}).get(method, {}).get(option)
        cells = []
        for r in sorted(runs, key=lambda r: r["config"]["training"][option]):
            value = r["config"]["training"][option]
            cell = (f"{value:g} → diverged" if r["metrics"] is None else
                    f"{value:g} → {_pct((r['metrics']['val_avg_acc'] or [None])[-1])}")
            cells.append(f"**{cell}**" if value == chosen else cell)
        lines.append(f"| {benchmark} (`{protocol}`, seed {seed}) | {DISPLAY[method]} | "
                     f"`{option}` | {', '.join(cells)} |")
    lines.append("")
    for key in sorted(strengths):
        benchmark, _, protocol = key.partition("@")
        chosen = ", ".join(f"{DISPLAY[m]} `{STRENGTH_OPTION[m]}` = {e[STRENGTH_OPTION[m]]:g}"
                           + (" (at the edge of the range tried)" if e.get("at_edge") else "")
                           for m, e in strengths[key].items())
        lines.append(f"- Chosen for {benchmark} grids under protocol `{protocol or 'paper'}`: "
                     f"{chosen}.")
    lines.append("")
    used = defaultdict(dict)  # (benchmark, protocol) → {method: the strength its runs used}
    for r in records:
        if r["role"] == "grid" and r["method"] in STRENGTH_OPTION:
            used[(r["benchmark"], r["protocol"])].setdefault(
                r["method"], r["config"]["training"][STRENGTH_OPTION[r["method"]]])
    for (benchmark, protocol), by_method in sorted(used.items()):
        if strengths_key(benchmark, protocol) not in strengths:
            values = ", ".join(f"{DISPLAY[m]} `{STRENGTH_OPTION[m]}` = {v:g}"
                               for m, v in by_method.items())
            lines.append(f"- {benchmark} (`{protocol}`) has no search of its own: its runs use "
                         f"{values} (borrowed from the closest searched benchmark).")
    if any(e.get("at_edge") for entry in strengths.values() for e in entry.values()):
        lines.append("- A value marked at the edge stayed best after the range was extended "
                     "twice: the optimum may lie further out.")
    lines += ["- Diverged: the loss or weights stopped being finite with plain SGD at lr 0.01 — "
              "the upper end of each range is bounded by stability, not by accuracy.", ""]
    return lines


def protocol_section(groups: dict) -> list[str]:
    lines = ["## Protocol", "",
             "Network: MLP 784-hidden (ReLU; the paper's 784-256-256 unless the table says "
             "otherwise) with a DHP-Softmax output layer (slow weights θ, "
             "plasticity α, learned rate η, Hebbian trace never reset) or, for the plain rows, a "
             "linear output layer without bias; consolidation penalties act on slow weights only. "
             "Optimiser: plain SGD, no momentum, cross-entropy. Evaluation after every task on "
             "every task's full test set.", "",
             "| Benchmark (protocol) | epochs/task | batch | lr | hidden | tasks | strengths used "
             "| Fisher samples | val hold-out | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (benchmark, protocol), variants in groups.items():
        runs = [r for rs in variants.values() for r in rs]
        training = runs[0]["config"]["training"]
        strengths = {}
        for r in runs:
            method = r["method"]
            if method in STRENGTH_OPTION:
                option = STRENGTH_OPTION[method]
                strengths.setdefault(f"{DISPLAY[method]} {option}", set()).add(
                    r["config"]["training"][option])
        strength_text = "; ".join(f"{name} {', '.join(f'{v:g}' for v in sorted(values))}"
                                  for name, values in strengths.items()) or "—"
        seeds = sorted({r["seed"] for r in runs})
        lines.append(
            f"| {benchmark} (`{protocol}`) | {training['epochs']} | {training['batch_size']} | "
            f"{training['lr']:g} | {'-'.join(map(str, training['hidden']))} | "
            f"{len(runs[0]['metrics']['avg_acc'])} | {strength_text} | "
            f"{training['fisher_samples']} | {training['val_fraction']:g} | "
            f"{','.join(map(str, seeds))} |")
    return lines + ["", "### Choices the paper does not state", "", CHOICES]


def time_section(records, groups: dict) -> list[str]:
    lines = ["## Wall time", ""]
    machines = sorted({(r["machine"]["cpu"], r["machine"]["cores"], r["machine"]["torch"])
                       for r in records})
    for cpu, cores, torch_version in machines:
        lines.append(f"Machine: {cpu}, {cores} logical cores, torch {torch_version} (CPU); "
                     f"shared with other jobs, so times are indicative only.")
    lines += ["", "Wall time = training + consolidation + evaluation of a run, summed over its "
              "sittings (data loading excluded).", "",
              "| Benchmark (protocol) | runs | total | mean per run | slowest variant (mean) |",
              "|---|---|---|---|---|"]
    total = 0.0
    for (benchmark, protocol), variants in groups.items():
        runs = [r for rs in variants.values() for r in rs]
        wall = sum(r["wall_s"] for r in runs)
        total += wall
        slowest = max(variants, key=lambda v: statistics.fmean(r["wall_s"] for r in variants[v]))
        lines.append(f"| {benchmark} (`{protocol}`) | {len(runs)} | {format_duration(wall)} | "
                     f"{format_duration(wall / len(runs))} | {display_name(slowest)} "
                     f"({format_duration(statistics.fmean(r['wall_s'] for r in variants[slowest]))}) |")
    search = [r for r in records if r["role"] == "search"]
    if search:
        search_wall = sum(r["wall_s"] for r in search)
        total += search_wall
        lines.append(f"| strength search | {len(search)} | {format_duration(search_wall)} | "
                     f"{format_duration(search_wall / len(search))} | |")
    return lines + ["", f"Total: {format_duration(total)} of training.", ""]


def commands_section(records, sources) -> list[str]:
    argvs = sorted({" ".join(["python", _relative(Path(s["argv"][0])), *s["argv"][1:]])
                    for r in records for s in r["sessions"] if s.get("argv")})
    lines = ["## Commands", "", "Everything above, from a fresh clone (each step resumable; "
             "`make reproduce` runs these, `REPRODUCE_ARGS=\"--epochs 1\"` for the reduced "
             "permuted protocol):", "", "```",
             "python benchmarks/reproduce.py search     # strengths on Split MNIST's val split",
             "python benchmarks/reproduce.py search --benchmark permuted-mnist  # --epochs 1: e1",
             "python benchmarks/reproduce.py grid       # the paper grid, seeds 0-4",
             f"python benchmarks/results.py --from {' '.join(sources)} --out docs/RESULTS.md",
             "```", "", "The invocations that produced the recorded runs:", "", "```"]
    lines += argvs or ["(none recorded)"]
    lines += ["```", "", "One run alone, e.g. (every summary holds its own line under `command`):",
              "", "```"]
    examples = {}
    for r in records:
        if r["role"] == "grid":
            examples.setdefault((r["benchmark"], r["protocol"]), r["command"])
    lines += list(examples.values())
    return lines + ["```", ""]


def provenance_section(records) -> list[str]:
    commits = defaultdict(int)
    dirty = set()
    for r in records:
        commits[(r["commit"] or "unknown")[:12]] += 1
        dirty.update(r.get("dirty") or [])
    lines = ["## Provenance", "",
             "Every number above is computed from the run summaries under `docs/results/` "
             "(`runs/<benchmark>/<protocol>/<variant>/seed<k>.json`, `search/...`): each holds the "
             "run's full config, seed, the git commit it started from, its accuracy matrix, "
             "timings and the `dhp-train` command. Commits (runs started from each): "
             + ", ".join(f"`{c}` ({n})" for c, n in sorted(commits.items())) + "."]
    if dirty:
        lines.append(f"Some runs started with uncommitted changes to: "
                     f"{', '.join(f'`{d}`' for d in sorted(dirty))} (listed per run under "
                     f"`dirty`).")
    return lines + [""]


def render(records, strengths: dict, out: Path, sources) -> str:
    groups = grouped(records)
    lines = ["# Reproducing the DHP paper's table", "",
             "<!-- generated by benchmarks/results.py from the run summaries; do not edit -->", "",
             "Thangarasa, Miconi & Taylor, *Enabling Continual Learning with Differentiable "
             "Hebbian Plasticity* (IJCNN 2020): five methods (Finetune, EWC, Online EWC, SI, MAS), "
             "each with a plain softmax head and with the DHP-Softmax head, on Permuted MNIST, "
             "Imbalanced Permuted MNIST and Split MNIST.", ""]
    lines += ["## Status", ""]
    if not groups:
        lines += ["No grid runs recorded yet.", ""]
    for (benchmark, protocol), variants in groups.items():
        counts = [len(variants.get(v, [])) for v in VARIANTS]
        seeds = sorted({r["seed"] for runs in variants.values() for r in runs})
        complete = [s for s in seeds if all(s in {r["seed"] for r in variants.get(v, [])}
                                            for v in VARIANTS)]
        lines.append(f"- {benchmark}, protocol `{protocol}`: {sum(counts)} finished runs, "
                     f"{sum(1 for c in counts if c)} of {len(VARIANTS)} variants; seeds with all "
                     f"{len(VARIANTS)} variants: {_seed_list(complete)}; seeds started: "
                     f"{_seed_list(seeds)}.")
    for (benchmark, protocol, variant), seeds in sorted(diverged_seeds(records).items()):
        lines.append(f"- diverged (non-finite loss; no accuracy, not retried): {benchmark} "
                     f"`{protocol}` {display_name(variant)}, seed {', '.join(map(str, seeds))}.")
    if groups:
        lines += ["", "## Headline", "",
                  "Final average accuracy (mean ± std over seeds). A DHP gain is called beyond "
                  "noise when its paired mean exceeds two standard errors (2·std/√n).", ""]
        lines += [headline(key, variants) for key, variants in groups.items()]
        lines += [""] + findings_section(groups)
    lines += ["", "## Final average accuracy", ""]
    for key, variants in groups.items():
        plot_name = f"results-{key[0]}-{key[1]}.png"
        plot_curves(variants, f"{key[0]} ({key[1]})", out.parent / plot_name)
        lines += benchmark_section(key, variants, plot_name, diverged_seeds(records))
    lines += gains_section(groups) if groups else []
    lines += ablation_section(groups) if groups else []
    lines += search_section(records, strengths)
    lines += protocol_section(groups) if groups else []
    lines += time_section(records, groups) if records else []
    lines += commands_section(records, sources)
    lines += provenance_section(records)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="sources", nargs="+", default=["docs/results"],
                        help="summary folders and/or run directory trees (default docs/results)")
    parser.add_argument("--strengths", type=Path,
                        help="chosen strengths JSON (default: strengths.json in the first --from)")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    args = parser.parse_args(argv)
    records = load_records(args.sources)
    strengths_path = args.strengths or Path(args.sources[0]) / "strengths.json"
    strengths = json.loads(strengths_path.read_text()) if strengths_path.exists() else {}
    text = render(records, strengths, args.out, args.sources)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    grid = sum(r["role"] == "grid" for r in records)
    print(f"{args.out}: {grid} grid runs, {len(records) - grid} search runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
