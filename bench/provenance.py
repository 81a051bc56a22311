"""Which code produced a benchmark's numbers: the short git commit of this checkout, recorded in every results JSON
(bench/report.py prints it beside the machine and date)."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD's short hash of the repository this file lives in (whatever the working directory), or "unknown"
    outside a git checkout or without git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
