"""The process's peak resident memory, measured the way our bounds are stated."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far, in bytes: the kernel's high-water mark (VmHWM).

    Not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at its parent's peak (it survives fork
    and exec), so a process started by a large one (pytest, a notebook, a benchmark driver) reports
    the parent's peak, not its own. Falls back to ``ru_maxrss`` where /proc is unavailable.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024
