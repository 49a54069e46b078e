"""One writer per checkpoint directory: a run holds `{--save}/writer.lock` while it trains.

The lock is an exclusive `flock` on that file, which names its holder (host, pid, since when).
The kernel drops a flock when its process ends, however it ends, so a run killed with `kill -9`
leaves a file whose lock is free: the next run on that host takes it over. A holder that is still
alive (e.g. torchrun's workers, which outlive a killed launcher in their own process groups) keeps
its flock and the newcomer is refused with the holder's host and pid.

Two cases cannot be decided from here, and are refused with what to do: the file names another
host (on a shared filesystem whose locks are per node, its flock says nothing about that host),
and the file names a live process of this host while its flock is free (a filesystem without
working locks).

Rank 0 alone takes the lock, before anything is written; the other ranks learn the outcome
through a broadcast, so that every rank stops with the same message.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import torch.distributed as dist

from megatron_rmt import parallel
from megatron_rmt.config import UserError

LOCK_NAME = "writer.lock"


class SaveDirLocked(UserError):
    """Another run writes, or may write, to the same --save directory."""


@contextlib.contextmanager
def save_lock(root: str | None):
    """Collective: hold `root`'s writer lock for the body (nothing when `root` is None).
    Every rank raises SaveDirLocked when rank 0 could not take it."""
    if not root:
        yield
        return
    lock = parallel.agree(lambda: acquire(root) if dist.get_rank() == 0 else None, SaveDirLocked)
    try:
        yield
    finally:
        if lock is not None:
            release(lock)


def acquire(root: str) -> tuple[int, str]:
    """Take `root`'s writer lock for this process; returns (the locked descriptor, its path)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = _lock_or_holder(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if holder is None and _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one
    try:
        _check_previous(path, _read(fd))
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def release(lock: tuple[int, str]) -> None:
    """Remove the lock file, then let go of it (at the end of a run)."""
    fd, path = lock
    if _same_file(fd, path):
        os.remove(path)
    os.close(fd)


def _lock_or_holder(fd: int, path: str) -> dict | None:
    """None once this process holds the flock; raises SaveDirLocked naming a live holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        holder = _read(fd)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        return None  # no locks on this filesystem: _check_previous judges by the pid
    raise SaveDirLocked(
        f"{os.path.dirname(path)}: another run writes there ({_describe(holder)}); "
        f"stop it or choose another --save"
    )


def _check_previous(path: str, holder: dict | None) -> None:
    """The flock is ours: decide whether the run named in the file is certainly gone."""
    if not holder or holder.get("pid") == os.getpid():
        return
    root = os.path.dirname(path)
    if holder.get("host") != socket.gethostname():
        raise SaveDirLocked(
            f"{root}: a run on another host may write there ({_describe(holder)}); if it has "
            f"ended, remove {path} and start again"
        )
    if _alive(holder.get("pid")):
        raise SaveDirLocked(
            f"{root}: {path} names a running process ({_describe(holder)}) but its lock is free "
            f"(does this filesystem support flock?); if that process is not a run, remove "
            f"{path} and start again"
        )
    print(
        f"{root}: taking over the writer lock of {_describe(holder)}, which has ended", flush=True
    )


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown: the lock is being taken"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)
