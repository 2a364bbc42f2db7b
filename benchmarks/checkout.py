r"""Makes a script of this folder import the dhp_deploy of its own checkout.

An editable install (``make install``) points at the checkout it was made from, so a script run
from another one (a git worktree pinned at one commit for a long grid) would otherwise train that
checkout's code, as it stands when each process starts, while recording this one's commit.
Import this module before ``dhp_deploy``.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the checkout: its dhp_deploy is the one imported

for _path in (str(ROOT), str(HERE)):  # then the scripts' own packages (reproduction, timing)
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


def child_environment() -> dict:
    r"""This process's environment for a Python child process that imports the same package."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
