r"""Statistics over run records: mean ± std, grouping, paired differences, noise verdicts."""

import math
import statistics
from collections import defaultdict

from reproduction.naming import BENCHMARK_ORDER

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


STOP_KINDS = {"non-finite": "the loss or the weights became non-finite",
              "unstable": "refused by the stability check: the penalty grew too stiff for SGD"}


def stop_kind(record) -> str:
    r"""Why a run that recorded no accuracy stopped: ``"unstable"`` (dhp-train's stability check
    refused a task: lr · the penalty's curvature > 2) or ``"non-finite"`` (NaN / inf)."""
    return "unstable" if "too strong for SGD" in record["diverged"].get("error", "") \
        else "non-finite"


def diverged_seeds(records) -> dict:
    r"""``{(benchmark, protocol, variant, stop kind): [seeds]}`` of the grid's runs that stopped
    without an accuracy."""
    seeds = defaultdict(list)
    for r in records:
        if r["role"] == "grid" and r["metrics"] is None:
            seeds[(r["benchmark"], r["protocol"], r["variant"], stop_kind(r))].append(r["seed"])
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


def sign_test(diffs) -> tuple[int, int, float]:
    r"""``(negatives, nonzero pairs, two-sided sign-test p)`` of paired differences: how unlikely
    this many pairs of one sign would be if either sign were equally likely."""
    signs = [d for d in diffs if d != 0]
    n, k = len(signs), sum(d < 0 for d in signs)
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2 ** n if n else 1.0
    return k, n, min(1.0, 2 * tail)
