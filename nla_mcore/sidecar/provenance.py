"""Who wrote a sidecar, when, from which commit: the values ``Provenance.current()`` records.
Best effort: without git or an installed distribution they still give a value or None.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (``2026-11-25T10:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def created_by() -> str:
    """``"nla-mcore <version>"``."""
    try:
        return f"nla-mcore {version('nla-mcore')}"
    except PackageNotFoundError:
        return "nla-mcore (not installed)"


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """HEAD of the checkout this package runs from (or ``repo_dir``); None if there is none.

    Without ``repo_dir``, a HEAD is only reported when the package directory is the checkout's
    ``nla_mcore/`` (an installed copy inside some other repository reports None).
    """
    package_dir = Path(__file__).resolve().parent.parent  # nla_mcore/, not nla_mcore/sidecar/
    cwd = Path(repo_dir) if repo_dir is not None else package_dir
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--verify", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 2:
        return None
    toplevel, commit = lines
    if repo_dir is None and Path(toplevel).resolve() / "nla_mcore" != package_dir:
        return None
    return commit
