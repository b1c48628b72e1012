"""One writer per run directory: an advisory ``fcntl.flock`` on a lock file inside it.

``iwm-train`` and ``iwm-finetune`` hold the writer lock for as long as they run; a second one is refused at once
(``RunInUseError``, one line). The kernel drops a flock when its process dies, however it dies, so a lock left
by a killed run never blocks a rerun. Under torchrun rank 0 holds it and tells the other ranks the outcome. The
lock file itself is never removed: a waiter that opened it before an unlink would lock a file nobody else sees.

``iwm-eval`` takes no writer lock. Whoever writes a run's outputs (the end of a run, ``iwm-eval``) holds the
short outputs lock while it writes a file and records which checkpoint it came from, so a file and its record
always change together.
"""
import contextlib
import errno
import fcntl
import os
import socket
import time

READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class RunInUseError(RuntimeError):
    """Another process holds the run directory's writer lock."""


def _holder(fd):
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


class RunLock:
    """The writer lock of the run directory ``run`` (a ``RunDir``), taken by ``acquire``, dropped by ``release``."""

    def __init__(self, run, who):
        self.run, self.who = run, who
        self.fd = None
        self.read_only = False

    def acquire(self):
        """Take the lock, or raise RunInUseError naming its holder. A run directory this process cannot write
        to is not locked: ``read_only`` is then True (a writer that needs the directory fails on its own)."""
        path = self.run.lock_path
        try:
            os.makedirs(self.run.path, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in READ_ONLY_ERRNOS:
                raise
            self.read_only = True
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunInUseError(f"{self.run.path} is in use by another writer ({holder or 'a running process'}); "
                                "one iwm-train or iwm-finetune at a time writes a run directory: wait for it to "
                                "end, or give another directory") from None
        self.fd = fd
        stamp = f"{self.who} pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with contextlib.suppress(OSError):  # who holds it is a courtesy to the next one refused
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode(), 0)
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _tell_ranks(outcome, rank):
    """Rank 0's outcome (None, or ``(read_only, message)``) on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outcome
    box = [outcome if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lock_run(run, who, rank=0):
    """The writer lock of ``run`` held by rank 0, its outcome told to every rank: a RunLock on rank 0 (a stand-in
    holding nothing elsewhere) whose ``read_only`` every rank shares; RunInUseError on every rank if refused."""
    lock, refused = RunLock(run, who), None
    if rank == 0:
        try:
            lock.acquire()
        except RunInUseError as e:
            refused = str(e)
    read_only, refused = _tell_ranks((lock.read_only, refused), rank)
    if refused is not None:
        raise RunInUseError(refused)
    lock.read_only = read_only
    return lock


@contextlib.contextmanager
def outputs_lock(run):
    """Hold ``run``'s outputs lock (blocking: its holders write a few files). An OSError where the directory
    cannot be written."""
    fd = os.open(run.outputs_lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock
