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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkout.py beside us
import checkout  # noqa: E402,F401  (this checkout's dhp_deploy, then the reproduction package)
from dhp_deploy.run_dir import atomic_write_text  # noqa: E402
from reproduction.records import load_adaptations, load_records  # noqa: E402
from reproduction.report import render  # noqa: E402


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
    text = render(records, strengths, args.out, args.sources, load_adaptations(args.sources))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)  # a reader never sees half a report
    roles = {role: sum(r["role"] == role for r in records) for role in ("grid", "search", "trace")}
    print(f"{args.out}: " + ", ".join(f"{count} {role} runs" for role, count in roles.items()),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
