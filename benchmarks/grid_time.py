r"""The paper grid's time on this host, measured from a grid's run records, against the host's
arithmetic limit (its fp32 matmul peak, measured here, in the same process).

    python benchmarks/grid_time.py --summaries docs/results-timing --jobs 2 --elapsed 3300

Reads the summaries of the grid runs recorded under ``--summaries`` (``reproduce.py grid
--summaries …``), lists the whole paper grid (the jobs ``reproduce.py grid`` runs by default) and
reports, per benchmark: the runs measured, their recorded wall time (training, consolidation,
evaluation), the whole grid's time projected from them (a run not yet measured takes the mean of
its benchmark and variant's measured runs, else its benchmark's), that time at ``--jobs`` one-thread
processes, and the arithmetic limit: the grid's training samples × the nominal FLOPs of a training
sample (3 × the forward's 2·in·out per layer) ÷ the host's peak. ``--elapsed``: the measured
runs' real elapsed time (from the grid's start to its last run's end); its ratio to their
recorded wall time ÷ jobs is the overhead factor (process starts, data builds, files, uneven
packing), by which the projection is then multiplied. ``--search-elapsed``: the real seconds the
strength searches took (``reproduce.py search`` prints them), which the grid needs first: with
both, the time from nothing to the report. Run it on an idle machine: the peak is measured here.
"""

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkout.py beside us
import checkout  # noqa: E402,F401  (this checkout's dhp_deploy, then the reproduction package)
import reproduce  # noqa: E402
from dhp_deploy.io import atomic_write_text  # noqa: E402
from dhp_deploy.metrics import format_duration  # noqa: E402
from reproduction.jobs import grid_jobs  # noqa: E402
from reproduction.records import read_summary  # noqa: E402
from timing import describe_peak, matmul_peak, training_flops_per_sample  # noqa: E402


def measured_and_grid(summaries: Path, strengths: Path) -> tuple[list, list]:
    r"""(the grid's jobs as ``(benchmark, variant, summary or None)``, the host names recorded)."""
    args = reproduce.parse_arguments(["grid", "--summaries", str(summaries), "--strengths",
                                      str(strengths), "--runs", str(summaries / "unused"),
                                      "--jobs", "1", "--cohort", "1"])  # no auto choice to log
    rows, hosts = [], set()
    for config, _, _, summary_path in grid_jobs(args):
        record = read_summary(summary_path) if summary_path.exists() else None
        if record is not None:
            hosts.add(record["machine"]["cpu"])
        rows.append((config.benchmark, summary_path.parent.name, record))
    return rows, sorted(hosts)


def projection(rows: list) -> dict:
    r"""Per benchmark: measured runs, their wall and samples; the grid's projected wall and
    samples (unmeasured runs at the mean of their variant's measured runs, else the benchmark's).
    A run that diverged counts with the time it took; only finished runs project others."""
    by_variant, by_benchmark = defaultdict(list), defaultdict(list)
    for benchmark, variant, record in rows:
        if record is not None and record["metrics"] is not None:
            entry = (record["wall_s"], record["timings"]["samples"])
            by_variant[benchmark, variant].append(entry)
            by_benchmark[benchmark].append(entry)
    table = {}
    for benchmark, variant, record in rows:
        line = table.setdefault(benchmark, {"runs": 0, "measured": 0, "measured_wall": 0.0,
                                            "wall": 0.0, "samples": 0.0, "unknown": 0})
        line["runs"] += 1
        if record is not None:
            line["measured"] += 1
            line["measured_wall"] += record["wall_s"]
            entries = [(record["wall_s"], record["timings"]["samples"])]
        else:
            entries = by_variant.get((benchmark, variant)) or by_benchmark.get(benchmark)
        if not entries:
            line["unknown"] += 1
            continue
        line["wall"] += sum(wall for wall, _ in entries) / len(entries)
        line["samples"] += sum(samples for _, samples in entries) / len(entries)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", type=Path, required=True,
                        help="where the timed grid's summaries are (reproduce.py --summaries)")
    parser.add_argument("--strengths", type=Path, default=reproduce.COMMITTED_SUMMARIES
                        / "strengths.json", help="the strengths the grid ran with")
    parser.add_argument("--jobs", type=int, default=2, help="one-thread processes of the grid")
    parser.add_argument("--elapsed", type=float, default=None,
                        help="real seconds the measured runs took, start to end (optional)")
    parser.add_argument("--search-elapsed", type=float, default=None,
                        help="real seconds the strength searches took (optional)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the report as Markdown to this file")
    args = parser.parse_args()
    if args.search_elapsed and not args.elapsed:
        parser.error("--search-elapsed needs --elapsed (the grid's overhead factor)")
    lines = report(args)
    print("\n".join(lines))
    if args.out is not None:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
        command = " ".join(["python benchmarks/grid_time.py", *sys.argv[1:]])
        atomic_write_text(args.out, f"# The paper grid's time\n\n<!-- generated by "
                          f"benchmarks/grid_time.py; do not edit -->\n\nMeasured "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
                          f"`{commit}`: `{command}`\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


def report(args) -> list[str]:
    rows, hosts = measured_and_grid(args.summaries, args.strengths)
    table = projection(rows)
    peak = matmul_peak()
    flops = training_flops_per_sample()["nominal"]
    lines = []
    out = lines.append
    out(f"host of the runs: {', '.join(hosts) or 'none measured'}; this host: "
        f"{describe_peak(peak)}")
    total = {"runs": 0, "measured": 0, "measured_wall": 0.0, "wall": 0.0, "samples": 0.0,
             "unknown": 0}
    out(f"{'benchmark':<28}{'runs':>6}{'measured':>10}{'measured wall':>15}"
        f"{'grid, 1 proc':>14}{f'at --jobs {args.jobs}':>13}{'limit':>9}{'ratio':>7}")
    for benchmark, line in [*table.items(), ("whole grid", total)]:
        if benchmark != "whole grid":
            for key in total:
                total[key] += line[key]
        limit = line["samples"] * flops / (peak["peak"] * 1e9)
        parallel = line["wall"] / args.jobs
        out(f"{benchmark:<28}{line['runs']:>6}{line['measured']:>10}"
            f"{format_duration(line['measured_wall']):>15}{format_duration(line['wall']):>14}"
            f"{format_duration(parallel):>13}{format_duration(limit):>9}"
            f"{parallel / limit if limit else float('nan'):>7.2f}")
    if total["unknown"]:
        out(f"{total['unknown']} run(s) of benchmarks with no measured run: not counted")
    if args.elapsed and total["measured"]:
        overhead = args.elapsed / (total["measured_wall"] / args.jobs)
        out(f"measured runs: {format_duration(args.elapsed)} elapsed for "
            f"{format_duration(total['measured_wall'])} of recorded wall time at --jobs "
            f"{args.jobs}: overhead factor {overhead:.3f}; the whole grid at that factor: "
            f"{format_duration(total['wall'] / args.jobs * overhead)} (limit "
            f"{format_duration(total['samples'] * flops / (peak['peak'] * 1e9))})")
        if args.search_elapsed:
            whole = args.search_elapsed + total["wall"] / args.jobs * overhead
            out(f"strength searches: {format_duration(args.search_elapsed)} elapsed (measured); "
                f"from nothing to the report: {format_duration(whole)}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
