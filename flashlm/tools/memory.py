"""Peak memory of this process.

/proc/self/status VmHWM is the high-water mark of this process image. getrusage's ru_maxrss is not: Linux carries
it across execve, so a child started from a large process (a test runner, say) reports its parent's peak.
"""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
