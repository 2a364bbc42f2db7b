r"""Cold build time of each benchmark from the MNIST files.

Each benchmark is built in a fresh Python process (no decoded-file cache, no warm allocator), so
"cold" means: verify MD5s, decode the gz files, build every task. Interpreter start and
``import torch`` are not counted. A second build in the same process is shown as "warm".

    python benchmarks/bench_data.py [--data-dir DIR] [--only NAME]
"""
import argparse
import json
import subprocess
import sys
import time

from timing import Figures


def measure(name: str, data_dir: str | None) -> dict:
    r"""Build ``name`` twice in this process: cold (first), then warm (decoded files cached)."""
    import resource

    from dhp_deploy.tasks import build_benchmark

    start = time.perf_counter()
    bench = build_benchmark(name, data_dir)
    cold = time.perf_counter() - start
    sizes = {k: sum(t.sizes[k] for t in bench.tasks) for k in ("train", "val", "test")}
    tensor_bytes = sum(x.numel() * x.element_size() for t in bench.tasks
                       for x in (t.x_train, t.x_val, t.x_test, t.y_train, t.y_val, t.y_test))
    del bench
    start = time.perf_counter()
    build_benchmark(name, data_dir)
    warm = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": name, "cold_s": cold, "warm_s": warm, "tasks_examples": sizes,
            "tensors_mib": tensor_bytes / 2**20, "peak_rss_mib": peak_kib / 1024}


def main() -> None:
    from dhp_deploy.tasks import BENCHMARKS
    from dhp_deploy.data import resolve_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="data root (default: $DHP_DATA_DIR, else ./data)")
    parser.add_argument("--only", choices=BENCHMARKS, help="one benchmark instead of all")
    parser.add_argument("--json", help="also write the key figures and numbers here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, as JSON, in this fresh process
        print(json.dumps(measure(args.only, args.data_dir)))
        return
    data_dir = str(resolve_data_dir(args.data_dir))
    print(f"data: {data_dir}   python {sys.version.split()[0]}")
    figures = Figures()
    figures.key(f"{'benchmark':<28}{'cold s':>8}{'warm s':>8}{'train':>9}{'test':>9}"
                f"{'tensors MiB':>13}{'peak RSS MiB':>14}")
    for name in [args.only] if args.only else BENCHMARKS:
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--only", name, "--data-dir", data_dir],
            capture_output=True, text=True,
        )
        if child.returncode:
            sys.exit(f"{name}: failed\n{child.stderr.strip()}")
        r = json.loads(child.stdout)
        sizes = r["tasks_examples"]
        figures.key(f"{name:<28}{r['cold_s']:>8.2f}{r['warm_s']:>8.2f}{sizes['train']:>9}"
                    f"{sizes['test']:>9}{r['tensors_mib']:>13.0f}{r['peak_rss_mib']:>14.0f}")
        figures.data[name] = r
    figures.write(args.json)


if __name__ == "__main__":
    main()
