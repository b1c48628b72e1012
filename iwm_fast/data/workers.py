"""DataLoader workers leave SIGTERM and SIGINT to the main process, which decides what a stop means.

SLURM's time limit and ``scancel``, ``kill -- -PGID`` and Ctrl-C signal every process of a job, loader
workers included, in no set order. A worker that dies of it makes the main process raise "DataLoader worker
(pid N) is killed by signal" wherever it is, so the run could not save its stop checkpoint. Workers therefore
ignore both signals (``ignore_stop_signals``, their ``worker_init_fn``). So that no signal lands between the
fork and that call, the main process holds both signals blocked while it starts workers
(``stop_signals_held``): the forked worker inherits the blocked mask, ignores the signals, then unblocks them
(a signal sent to it meanwhile stays pending and is discarded); the main process receives its own as soon as
the workers are started. (With the forkserver or spawn start methods the worker does not inherit the mask; a
signal in its first moments, before ``ignore_stop_signals`` runs, still ends it.)

A worker that ignores SIGTERM no longer ends when ``multiprocessing``'s exit hook terminates it, which would
hang the interpreter's exit on a loader left open. Loaders hand their iterators to ``track``; an exit hook
(run before ``multiprocessing``'s, atexit being last-in first-out) shuts their workers down and SIGKILLs any
that do not end. A worker whose main process died without exiting (SIGKILL) ends by itself: PyTorch's
workers watch their parent.
"""
import atexit
import contextlib
import signal
import threading
import weakref

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_tracked = weakref.WeakSet()


def ignore_stop_signals(worker_id=None):
    """``worker_init_fn``: ignore SIGTERM and SIGINT in this worker, then let them through (discarded)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_held():
    """Block SIGTERM and SIGINT in the main thread while loader workers are forked (see the module doc)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_workers(loader):
    """``iter(loader)`` with the stop signals held while its workers start; the iterator is tracked."""
    with stop_signals_held():
        iterator = iter(loader)
    track(iterator)
    return iterator


def track(iterator):
    if getattr(iterator, "_workers", None):
        _tracked.add(iterator)


def shutdown(iterator):
    """Stop a loader iterator's workers now: PyTorch's orderly shutdown, then SIGKILL for any still alive
    (they ignore the SIGTERM that PyTorch's shutdown falls back on)."""
    if iterator is None or not getattr(iterator, "_workers", None):
        return
    try:
        iterator._shutdown_workers()
    finally:
        for w in iterator._workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        _tracked.discard(iterator)


@atexit.register
def _shutdown_tracked():
    for iterator in list(_tracked):
        shutdown(iterator)
