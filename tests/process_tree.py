"""Processes of a test's job, read from /proc (Linux): the children of a pid, and waiting for pids to end."""
import os
import time


def children(pid):
    """Pids whose parent is ``pid`` (zombies included until reaped)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid):
    """Whether ``pid`` runs (a zombie, ended but not reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout):
    """Wait until none of ``pids`` runs; returns those still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return set()
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


def epoch_with_signalled_workers(loader, num_workers, signals):
    """One epoch of ``loader`` whose ``num_workers`` worker processes get ``signals`` after the first batch:
    (the batches, the workers' pids)."""
    import os as _os

    before = children(_os.getpid())
    batches = iter(loader)
    got = [next(batches)]
    workers = children(_os.getpid()) - before
    assert len(workers) == num_workers
    for pid in workers:
        for sig in signals:
            _os.kill(pid, sig)
    got += list(batches)  # the rest of the epoch, from the same workers
    return got, workers
