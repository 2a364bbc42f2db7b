r"""Statistics over run records: mean ± std, grouping, paired differences, noise verdicts."""

import math
import statistics
from collections import defaultdict

from reproduction.naming import BENCHMARK_ORDER, PROTOCOL_VARIANTS

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
    r"""``{(benchmark, protocol): {variant: [records sorted by seed]}}`` of the grid's runs
    (not those of a protocol variant such as ``~fixed-perms``: their study reports them)."""
    groups = defaultdict(lambda: defaultdict(list))
    for record in records:
        if (record["role"] == "grid" and record["metrics"] is not None
                and not protocol_variant(record["variant"])):
            groups[(record["benchmark"], record["protocol"])][record["variant"]].append(record)
    for variants in groups.values():
        for runs in variants.values():
            runs.sort(key=lambda r: r["seed"])
    order = {name: i for i, name in enumerate(BENCHMARK_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1])))


def protocol_variant(variant: str) -> bool:
    return any(suffix in PROTOCOL_VARIANTS for suffix in variant.split("~")[1:])


# A collapse: the average accuracy over the tasks seen falls by more than this after one task
# (fine-tuning forgets a few pp per task on Permuted MNIST; a collapse loses a quarter or more).
COLLAPSE_DROP = 0.20


def collapsed(record) -> bool:
    r"""Whether a finished run's average accuracy ever dropped by more than COLLAPSE_DROP from
    one task to the next."""
    averages = record["metrics"]["avg_acc"]
    return any(before - after > COLLAPSE_DROP for before, after in zip(averages, averages[1:]))


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
MIN_SEEDS_FOR_VERDICT = 3  # below this a t-test has one or no degree of freedom to speak of
ALPHA = 0.05  # family-wise error rate of the report's tests (Holm)


# --------------------------------------------------------------------------- distributions


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    # Lentz's method for the continued fraction of the incomplete beta function.
    tiny, fraction = 1e-300, 1.0
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def incomplete_beta(a: float, b: float, x: float) -> float:
    r"""The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    r"""P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def f_cdf(f: float, df1: int, df2: int) -> float:
    r"""P(F ≤ f) for Fisher's F with (``df1``, ``df2``) degrees of freedom."""
    return incomplete_beta(df1 / 2, df2 / 2, df1 * f / (df1 * f + df2)) if f > 0 else 0.0


def variance_ratio_test(a, b) -> dict:
    r"""Two-sided F-test of equal variances of two independent samples: the ratio of their
    variances and its p-value. Sensitive to non-normal data (a collapsed run), so read it beside
    the values themselves."""
    a, b = list(a), list(b)
    ratio = statistics.variance(a) / statistics.variance(b)
    below = f_cdf(ratio, len(a) - 1, len(b) - 1)
    return {"ratio": ratio, "p": min(1.0, 2 * min(below, 1 - below))}


def t_quantile(probability: float, df: int) -> float:
    r"""The ``probability`` quantile (> 0.5) of Student's t, by bisection on the tail."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if t_two_sided_p(middle, df) / 2 > 1 - probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# --------------------------------------------------------------------------- paired tests


def paired_t(diffs) -> dict:
    r"""Paired t-test of ``diffs`` (one per seed) against 0: mean, 95% CI, two-sided p (t(n−1)).
    None where fewer than two differences."""
    n = len(diffs)
    if n < 2:
        return None
    mean, std = mean_std(diffs)
    se = std / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else t_two_sided_p(mean / se, n - 1))
    return {"n": n, "mean": mean, "ci": (mean - half, mean + half), "p": p,
            "median": statistics.median(diffs)}


def wilcoxon_signed_rank(diffs) -> float:
    r"""Exact two-sided p of Wilcoxon's signed-rank test (zeros dropped, ties get mid-ranks):
    robust where a few collapsed runs make the differences far from normal. With n = 5 its
    smallest possible p is 2/32 = 0.0625."""
    values = [d for d in diffs if d != 0]
    n = len(values)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(values[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(values[order[j + 1]]) == abs(values[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    doubled = [round(2 * r) for r in ranks]  # mid-ranks are halves: integers when doubled
    positive = sum(r for r, v in zip(doubled, values) if v > 0)
    counts = {0: 1}  # distribution of the doubled positive rank sum under H0, by convolution
    for r in doubled:
        step = dict(counts)
        for total, count in counts.items():
            step[total + r] = step.get(total + r, 0) + count
        counts = step
    expected = sum(doubled) / 2
    extreme = sum(c for total, c in counts.items()
                  if abs(total - expected) >= abs(positive - expected) - 1e-9)
    return min(1.0, extreme / 2 ** n)


def holm(p_values) -> list[float]:
    r"""Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


class TestFamily:
    r"""The report's family of paired tests, corrected together by Holm.

    The report is rendered twice: the first pass registers every difference it tests (each a
    t-test on seeds), the second reads the adjusted p. "Beyond noise" means adjusted p < ALPHA.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.p, self.adjusted, self.final = {}, {}, False

    @staticmethod
    def _key(diffs) -> tuple:
        return tuple(round(d, 12) for d in diffs)

    def register(self, diffs) -> None:
        result = paired_t(list(diffs))
        if result is not None and len(diffs) >= MIN_SEEDS_FOR_VERDICT:
            self.p.setdefault(self._key(diffs), result["p"])

    def close(self) -> None:
        keys = list(self.p)
        self.adjusted = dict(zip(keys, holm([self.p[k] for k in keys])))
        self.final = True

    def adjusted_p(self, diffs) -> float | None:
        if not self.final:
            self.register(diffs)
            return None
        return self.adjusted.get(self._key(diffs))

    def __len__(self) -> int:
        return len(self.p)


FAMILY = TestFamily()  # reset by report.render for each report


def verdict(diffs) -> str:
    r"""``"-8.20 pp [-15.81, -0.59], median -4.90, n=5, p=0.04, Holm p=0.9: within noise"``:
    the mean paired difference with its 95% t interval, the median, and the test's verdict."""
    if not diffs:
        return "—"
    if len(diffs) == 1:
        return f"{100 * diffs[0]:+.2f} pp, n=1"
    result = paired_t(list(diffs))
    low, high = (100 * bound for bound in result["ci"])
    text = (f"{100 * result['mean']:+.2f} pp [{low:+.2f}, {high:+.2f}], median "
            f"{100 * result['median']:+.2f}, n={result['n']}")
    if len(diffs) < MIN_SEEDS_FOR_VERDICT:
        return text + ", too few seeds"
    adjusted = FAMILY.adjusted_p(diffs)
    text += f", p={result['p']:.2g}"
    if adjusted is None:
        return text
    return text + f", Holm p={adjusted:.2g}: " + (
        "**beyond noise**" if adjusted < ALPHA else "within noise")


def is_beyond_noise(diffs) -> bool:
    r"""Whether the paired t-test of ``diffs`` is significant after Holm's correction over the
    report's family (False during the registering pass)."""
    if len(diffs) < MIN_SEEDS_FOR_VERDICT:
        return False
    adjusted = FAMILY.adjusted_p(diffs)
    return adjusted is not None and adjusted < ALPHA


def sign_test(diffs) -> tuple[int, int, float]:
    r"""``(negatives, nonzero differences, exact two-sided sign-test p)``: how unlikely this many
    of one sign would be if either sign were equally likely. Each difference must be one
    independent draw (one per seed, not several pairs of one seed)."""
    signs = [d for d in diffs if d != 0]
    n, k = len(signs), sum(d < 0 for d in signs)
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2 ** n if n else 1.0
    return k, n, min(1.0, 2 * tail)
