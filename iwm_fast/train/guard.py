"""The non-finite-loss guard: counts consecutive skipped steps from the flags the log window reads back."""


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Each step's ``finite`` flag is decided and acted on (update skipped) on the device; the guard sees the
    flags at log steps and stops the run once ``max_bad_steps`` steps in a row were non-finite."""

    def __init__(self, max_bad_steps, where):
        self.max_bad_steps, self.where = max_bad_steps, where
        self.bad_run = 0          # consecutive non-finite steps up to the last one seen
        self.empty_in_run = 0     # how many of them had no readable image at all

    def observe(self, steps, finite_flags, empty_flags):
        """Steps (1-based), their finiteness and whether they had no image; raises when the run must stop."""
        for step, ok, empty in zip(steps, finite_flags, empty_flags):
            if ok:
                self.bad_run, self.empty_in_run = 0, 0
                continue
            self.bad_run += 1
            self.empty_in_run += int(empty)
            if self.bad_run >= self.max_bad_steps:
                raise NonFiniteLossError(self._reason(step))

    def _reason(self, step):
        if self.empty_in_run == self.bad_run:
            return (f"no image could be decoded for {self.bad_run} steps in a row (last at step {step}): check "
                    f"data.root; stopping. The last good checkpoint is kept in {self.where}")
        return (f"{self.bad_run} consecutive steps had a non-finite loss (last at step {step}); stopping. "
                f"The last good checkpoint is kept in {self.where}")

    def check_finished(self, last_step):
        """A run whose last steps were skipped did not finish training: it must not export or evaluate."""
        if self.bad_run:
            raise NonFiniteLossError(
                f"the run ended on {self.bad_run} non-finite step(s) (through step {last_step}); its weights "
                f"are those before them. Not exporting or evaluating; the last good checkpoint is in {self.where}")
