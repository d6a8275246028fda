"""Temp siblings for atomic local writes, and the sweep of those a killed process left behind.

Every local write of nacd (a JSON record, a trajectory shard, a variant folder, a checkpoint, a
converted model) fills a hidden temp sibling of its final path and renames it into place, so a
reader sees all of it or nothing. A process killed mid-write (SIGKILL, the OOM killer, a lease that
ends) cannot remove its temp, and a checkpoint's or model's temp is hundreds of megabytes. So each
temp's name carries its owner (host, boot, PID namespace, PID), and making a temp removes the
folder's temps whose owner is provably gone: same host, same boot of the same kernel, same PID
namespace, and no process with that PID. Temps of live processes, of other machines sharing the
folder (even under the same host name), and of other PID namespaces are kept; where the boot or
namespace cannot be read, nothing is swept.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from functools import lru_cache
from pathlib import Path

TMP_MARK = ".tmp-"
_OWNER_SEP = "~"  # not in host names, nor in the suffixes tempfile draws


@lru_cache(maxsize=1)
def _machine() -> str | None:
    """This boot of this kernel and this PID namespace, or None where either cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}.{namespace}"


def owner_tag() -> str:
    """``host~boot.pidns~pid`` of this process, as its temp names carry it."""
    return _OWNER_SEP.join((socket.gethostname(), _machine() or "unknown", str(os.getpid())))


def _owner_is_gone(tag: str) -> bool:
    parts = tag.split(_OWNER_SEP)
    if len(parts) != 3 or not parts[2].isdigit() or _machine() is None:
        return False  # not a name this module made, or no way to tell: leave it
    host, machine, pid = parts[0], parts[1], int(parts[2])
    if host != socket.gethostname() or machine != _machine():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def sweep_dead_temps(folder: Path) -> list[Path]:
    """Remove the temps in ``folder`` (of any final name) whose owning process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or TMP_MARK not in entry.name:
            continue
        tag = entry.name.split(TMP_MARK, 1)[1].rpartition("-")[0]  # tempfile's suffix follows the last '-'
        if not _owner_is_gone(tag):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _temp_prefix(final: Path) -> str:
    return f".{final.name}{TMP_MARK}{owner_tag()}-"


def temp_dir_beside(final: Path) -> Path:
    """A new empty hidden folder next to ``final``, for a build that is renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(final.parent)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))


def temp_file_beside(final: Path) -> tuple[int, Path]:
    """An open descriptor and path of a new hidden file next to ``final``, to write and rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(final.parent)
    fd, path = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
    return fd, Path(path)


def set_aside_name(final: Path) -> Path:
    """Where ``final`` is moved while its replacement is renamed in: swept like a temp if left."""
    return final.with_name(f"{_temp_prefix(final)}old")
