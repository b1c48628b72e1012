"""Stop signals: SIGTERM (SLURM's time limit, ``scancel``, Kubernetes, ``kill``) and SIGINT (Ctrl-C).

During the training steps (``StopSignal``) the handler only sets a flag; the loop acts on it at a step
boundary (every step in a one-process run; at log steps when ranks must agree, since they may receive the
signal at different steps): it saves a checkpoint and exits with 143 (SIGTERM) or 130 (SIGINT). A watchdog
ends the process if that takes longer than ``grace_s`` seconds: a save cut short is never picked up
(checkpoints are renamed into place only when complete), so the previous checkpoint stays the one to resume
from. A repeated signal (torchrun forwards the Ctrl-C its ranks already got) changes nothing.

Whole-job signals reach the DataLoader workers too, which ignore them (``iwm_fast.data.workers``): the main
process decides. Outside the steps, the CLI turns a stop signal into ``Interrupted`` (one line, same exit
codes); during the end of a run (export, evaluation) ``exit_on_stop_signals`` says what was cut short and
what a rerun does. Under torchrun, ``watch_launcher`` stops a rank whose launcher died.
"""
import contextlib
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("iwm_fast")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal: a job manager must not mistake a
EXIT_CODE = EXIT_CODES[signal.SIGTERM]                  # stopped run for a finished one


def signal_name(signum):
    return signal.Signals(signum).name


class StopRequested(Exception):
    """Raised by the loop after the checkpoint of a requested stop is saved."""

    def __init__(self, step, checkpoint, signum=signal.SIGTERM, *, final=False):
        name = signal_name(signum)
        if final:
            text = (f"stopped by {name} after the last step ({step}); training is complete and saved in "
                    f"{checkpoint}; run the same command again to export and evaluate it (nothing is retrained)")
        else:
            text = f"stopped by {name} after step {step}; saved {checkpoint}; run the same command again to resume"
        super().__init__(text)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.exit_code = EXIT_CODES[signum]


class Interrupted(BaseException):
    """A stop signal outside the training steps (a BaseException, like KeyboardInterrupt: no ``except
    Exception`` swallows it)."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal_name(signum)} outside the training steps; nothing new was "
                         "lost (the run's last complete checkpoint is intact); run the same command again to "
                         "resume")
        self.signum, self.exit_code = signum, EXIT_CODES[signum]


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler):
    """Install ``handler`` for SIGTERM and SIGINT while the block runs (main thread only; else nothing)."""
    previous = {}
    if _in_main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def raise_on_stop_signals():
    """The CLI's handlers for the time outside the steps: raise ``Interrupted`` (a one-line exit)."""
    def handler(signum, frame):
        raise Interrupted(signum)
    return _handlers(handler)


def exit_on_stop_signals(what, rerun):
    """While ``what`` runs (the end of a run), a stop signal logs what was cut short and what a rerun does,
    then exits with 143 or 130 at once: there is nothing to save, the training is in its checkpoint."""
    def handler(signum, frame):
        log.error("%s during %s; %s", signal_name(signum), what, rerun)
        logging.shutdown()
        os._exit(EXIT_CODES[signum])
    return _handlers(handler)


class StopSignal:
    def __init__(self, grace_s, *, device, world_size):
        self.grace_s, self.device, self.world = grace_s, device, world_size
        self.requested_at, self.signum = None, None
        self._previous = {}
        if _in_main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, frame):
        if self.requested_at is not None:
            return
        self.requested_at, self.signum = time.monotonic(), signum
        log.warning("%s: saving a checkpoint at the next step boundary (grace %.0f s)", signal_name(signum),
                    self.grace_s)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        time.sleep(self.grace_s)
        log.error("%s grace of %.0f s ran out before the checkpoint was saved; exiting. The previous "
                  "checkpoint is intact", signal_name(self.signum), self.grace_s)
        os._exit(EXIT_CODES[self.signum])

    def should_stop(self, at_log_step):
        """Whether every rank stops now. Without other ranks, at any step; else at log steps, by agreement
        (a rank that got no signal itself stops with the highest signal number any rank got)."""
        if self.world == 1:
            return self.requested_at is not None
        if not at_log_step:
            return False
        flag = torch.tensor([float(self.signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and self.signum is None:
            self.signum = agreed
        return bool(agreed)

    def stopped(self, step, checkpoint, *, final=False):
        """The ``StopRequested`` to raise once the stop checkpoint of ``step`` is saved."""
        return StopRequested(step, checkpoint, self.signum or signal.SIGTERM, final=final)

    def close(self):
        """Give the signals back to the previous handlers; after a stop, ignore them instead: the process is
        on its way out (the watchdog still bounds it), and a signal torchrun forwards late must not replace
        the stop's message."""
        for sig, old in self._previous.items():
            signal.signal(sig, old if self.requested_at is None else signal.SIG_IGN)
        self._previous = {}


def watch_launcher(grace_s, *, poll_s=1.0):
    """Under torchrun, stop this rank when its launcher dies (SIGKILL to torchrun leaves ranks orphaned,
    training on and writing to the run directory): SIGTERM to itself, the path of a job stop, then an exit
    after ``grace_s`` if that has not ended the process.

    Why a thread polling the parent pid rather than prctl(PR_SET_PDEATHSIG): the death signal fires when the
    parent *thread* that started the process ends, not the parent process, so a launcher that starts ranks
    from a helper thread would kill them at once; it is Linux only; and it is lost if the parent died before
    the call. Polling once a second costs nothing, works on every POSIX system, and reuses the stop path, so
    an orphaned rank saves a checkpoint at the next agreed step instead of dying mid-step. Returns the thread,
    or None outside torchrun (a run whose shell exits, e.g. under nohup, must go on).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("the launcher (pid %d) is gone: stopping this rank as on SIGTERM", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s + 5.0)
        os._exit(EXIT_CODE)

    thread = threading.Thread(target=watch, name="iwm-launcher-watch", daemon=True)
    thread.start()
    return thread
