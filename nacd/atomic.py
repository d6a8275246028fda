"""Temp siblings for atomic local writes, and the sweep of those a killed process left behind.

Every local write of nacd (a JSON record, a trajectory shard, a variant folder, a checkpoint, a
converted model) fills a hidden temp sibling of its final path and renames it into place, so a
reader sees all of it or nothing. A process killed mid-write (SIGKILL, the OOM killer, a lease that
ends) cannot remove its temp, and a checkpoint's or model's temp is hundreds of megabytes. So each
temp's name carries its owner (host, PID namespace, PID), and the next write of the same path
removes the temps whose owner is provably gone: same host and namespace, no such process. Temps
of live processes, of other hosts sharing the folder, and of other PID namespaces are kept.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"
_OWNER_SEP = "~"  # not in host names, nor in the suffixes tempfile draws


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS): the host name and PID alone
        return "0"


def owner_tag() -> str:
    """``host~pidns~pid`` of this process, as temp names carry it."""
    return _OWNER_SEP.join((socket.gethostname(), _pid_namespace(), str(os.getpid())))


def _temp_prefix(final: Path) -> str:
    return f".{final.name}{TMP_MARK}"


def _owner_is_gone(tag: str) -> bool:
    parts = tag.split(_OWNER_SEP)
    if len(parts) != 3 or not parts[2].isdigit():
        return False  # not a name this module made: leave it
    host, namespace, pid = parts[0], parts[1], int(parts[2])
    if host != socket.gethostname() or namespace != _pid_namespace():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def sweep_dead_temps(final: Path) -> list[Path]:
    """Remove the temp siblings of ``final`` whose owning process is gone; returns what went."""
    prefix, removed = _temp_prefix(final), []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        tag = entry.name[len(prefix):].rpartition("-")[0]  # tempfile's suffix follows the last '-'
        if not _owner_is_gone(tag):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def temp_dir_beside(final: Path) -> Path:
    """A new empty hidden folder next to ``final``, for a build that is renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(final)
    return Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{owner_tag()}-", dir=final.parent))


def temp_file_beside(final: Path) -> tuple[int, Path]:
    """An open descriptor and path of a new hidden file next to ``final``, to write and rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(final)
    fd, path = tempfile.mkstemp(prefix=f"{_temp_prefix(final)}{owner_tag()}-", dir=final.parent)
    return fd, Path(path)


def set_aside_name(final: Path) -> Path:
    """Where ``final`` is moved while its replacement is renamed in: swept like a temp if left."""
    return final.with_name(f"{_temp_prefix(final)}{owner_tag()}-old")
