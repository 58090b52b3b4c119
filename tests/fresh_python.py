"""Fresh Python interpreters for the tests that need one (settings read once at import, a module made missing)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import Mapping, Optional, Sequence

#: Where they run: not the repository root, so that a test sees the installed package as a user does (``python -c``
#: and ``python -m`` put the working directory first on sys.path).
OUTSIDE_THE_REPOSITORY = tempfile.gettempdir()


def run_python(args: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter outside the repository; its output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=OUTSIDE_THE_REPOSITORY, env=None if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout)
