"""Output files that appear whole or not at all: writers fill a temporary file beside the target (same filesystem,
so the rename is atomic), named after the target and the writing process (`.NAME.tmp-PID`), and rename it into
place when complete; the directory is synced after the rename so the new name survives a crash.

A writer that is killed without a chance to clean up (SIGKILL, the OOM killer, power loss) leaves its temporary
behind. The next write of the same target removes the temporaries of processes that are no longer alive (a PID
in use again by an unrelated process keeps its file until that process ends: harmless, never a wrong delete).
Temporaries of temporaries (hf_convert's `.NAME.src-PID.gguf`, written through `..NAME.src-PID.gguf.tmp-PID`)
count as the target's.
"""

from __future__ import annotations

import os
import re

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?:tmp|src)-(?P<pid>\d+)(?:\.gguf)?$")


def temp_path(dst: str, kind: str = "tmp", suffix: str = "") -> str:
    """`.NAME.<kind>-PID<suffix>` beside dst; kind is "tmp" (becomes dst) or "src" (an intermediate file)."""
    directory, name = os.path.split(os.path.abspath(dst))
    return os.path.join(directory, f".{name}.{kind}-{os.getpid()}{suffix}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie (a killed writer not yet reaped is dead)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:  # no /proc (not Linux), or it ended meanwhile: signal 0 succeeded, call it alive
        return True


def _writer_pids(name: str, target: str) -> list[int] | None:
    """PIDs named in a temporary file's name made for `target` (one per level of nesting), else None."""
    pids = []
    while (m := _TEMP_NAME.match(name)) is not None:
        pids.append(int(m["pid"]))
        if m["target"] == target:
            return pids
        name = m["target"]
    return None


def remove_stale_temps(dst: str) -> list[str]:
    """Remove the temporaries of dst left by writers that are no longer alive; returns the paths removed."""
    directory, target = os.path.split(os.path.abspath(dst))
    try:
        names = os.listdir(directory)
    except OSError:  # a missing directory has no temporaries; the write itself reports what is wrong
        return []
    removed = []
    for name in names:
        pids = _writer_pids(name, target)
        if pids is None or any(pid_alive(pid) for pid in pids):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:  # another run removed it first
            pass
    return removed


def commit(tmp: str, dst: str) -> None:
    """Rename the complete temporary (already fsynced by its writer) onto dst and sync the directory entry."""
    os.replace(tmp, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_gguf(w, tmp: str, dst: str) -> None:
    """A gguf.GGUFWriter that has written everything into tmp: flush, fsync, close, then rename it onto dst."""
    w.fout[0].flush()
    os.fsync(w.fout[0].fileno())
    w.close()
    commit(tmp, dst)


def discard(tmp: str) -> None:
    """A write that failed: remove its temporary, if it got as far as creating one."""
    if os.path.exists(tmp):
        os.unlink(tmp)
