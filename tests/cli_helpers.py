"""Running the CLIs as real subprocesses, and what a user-facing error must look like."""

import os
import subprocess
import sys


def run_cli(command: str, *args, env: dict | None = None, timeout: float = 600):
    r"""Run ``dhp-<command>`` as a real subprocess of this interpreter; returns CompletedProcess.

    One OpenMP thread: this machine is shared, and results do not depend on the thread count.
    """
    full_env = {name: value for name, value in os.environ.items() if name != "DHP_TRAIN_FAULT"}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", f"dhp_deploy.cli.{command}", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(result, *phrases, exit_code: int | None = None) -> str:
    r"""The command failed (with ``exit_code`` if given) with one ``Error:`` line naming ``phrases``."""
    assert result.returncode != 0 if exit_code is None else result.returncode == exit_code, \
        result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], result.stderr
    return errors[0]

