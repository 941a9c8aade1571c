"""Process identity on this host: whose pids compare, and whether a pid still runs.

Peers publish their pid and pid namespace at set-up; a pid is checked only when the
namespaces are equal. C twin of pid_alive: native/shm.c pyccl_pid_alive (used inside waits).
"""
import os


def pid_namespace() -> int:
    """Inode of this process's pid namespace: peers' pids mean something only when equal."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]   # "pid (comm) S ...": comm may hold spaces
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
