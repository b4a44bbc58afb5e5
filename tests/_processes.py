"""What the tests that kill processes (``tests/test_ray_nodes.py``, ``tests/test_batch.py``) share: this machine's
live processes from /proc, and the descendants of a set of them."""
from __future__ import annotations

from pathlib import Path


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process we can read (zombies left out: they are dead
    already, and only their parent can reap them)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError, IndexError):
                continue
            if state != "Z":
                out[int(d.name)] = (int(ppid), cmd)
    return out


def with_descendants(roots: set[int], procs: dict[int, tuple[int, str]]) -> set[int]:
    """``roots`` and every process under them in ``procs`` (``processes()``)."""
    found = set(roots)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found
