r"""Command-line entry points, one module per command: ``dhp-train``, ``dhp-export``, ``dhp-serve``."""

import os

# torch's OpenMP runtime reads this once, when torch loads (so before any torch import here).
# Its default busy-waiting made 2 threads on this project's 2-core machines run 6x slower than
# one thread as soon as any other process wanted a core (4,100 vs 25,000 training samples/s);
# passive waiting keeps 2 threads as fast as 1 then. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
