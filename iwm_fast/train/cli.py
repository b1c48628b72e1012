"""Command-line entry points: ``iwm-train CONFIG [key=value ...]`` and ``iwm-eval RUN_DIR``.

A user error (a bad value, a malformed or missing file, a run that cannot resume, a full disk) is one line on
stderr and exit status 2; the config and the machine are checked before anything is written to the run
directory. Tracebacks are left for bugs.
"""
import argparse
import errno
import logging
import sys

from ..config import ConfigError, load_config
from .environment import check_environment


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="[iwm-fast] %(message)s", stream=sys.stderr)


def _user_errors():
    """The exceptions that mean "fix the input or the machine", not "fix the code"."""
    from .checkpoint import CheckpointError
    from .metrics import MetricsWriteError
    from .resume import ResumeError
    from ..run_lock import RunInUseError

    return (ConfigError, CheckpointError, MetricsWriteError, ResumeError, RunInUseError, FileNotFoundError,
            PermissionError)


def _is_environment_oserror(e):
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)


def _fail(parser, e):
    message = " ".join(str(e).split()) or type(e).__name__  # one line, however the message was built
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def train_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="iwm-train",
        description="Train IWM / I-JEPA. Overrides are dotted keys, e.g. train.steps=100 model.size=base "
                    "predictor.conditioning=none; see configs/ and README.md for all keys.")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    _setup_logging()
    from .stop_signal import Interrupted, raise_on_stop_signals

    try:
        with raise_on_stop_signals():  # the loop handles SIGTERM/SIGINT itself; outside it: one line
            return _train_command(parser, args)
    except Interrupted as e:
        logging.getLogger("iwm_fast").warning("%s", e)
        return e.exit_code


def _train_command(parser, args):
    try:
        cfg = load_config(args.config, args.overrides)
        check_environment(cfg)
    except ConfigError as e:
        _fail(parser, e)
    from .distributed import leave_process_group
    from .guard import NonFiniteLossError
    from .loop import train
    from .stop_signal import StopRequested, watch_launcher

    watch_launcher(cfg.train.term_grace_s)
    try:
        run_dir = train(cfg)
    except NonFiniteLossError as e:
        logging.getLogger("iwm_fast").error("%s", e)
        return 3
    except StopRequested as e:
        logging.getLogger("iwm_fast").warning("%s", e)
        return e.exit_code
    except _user_errors() as e:
        _fail(parser, e)
    except OSError as e:
        if not _is_environment_oserror(e):
            raise
        _fail(parser, e)
    finally:
        leave_process_group()
    print(f"run directory: {run_dir}")
    return 0


def eval_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="iwm-eval", description="Evaluate a finished or running IWM run: linear probe vs a random encoder, "
        "world-model MRR, loss-curve plot. Writes RUN_DIR/eval.json, world_model.png and loss_curve.png (a "
        "warning, not an error, where the run directory is read-only) and a finished run's target_encoder.pt where "
        "it is missing or of another checkpoint. Safe beside a running iwm-train: the run's end redoes an "
        "evaluation of an older checkpoint.")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the run's saved config: eval.* and train.device only")
    args = parser.parse_args(argv)
    _setup_logging()
    from .evaluate import evaluate_run

    try:
        evaluate_run(args.run_dir, overrides=args.overrides)
    except _user_errors() as e:
        _fail(parser, e)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
