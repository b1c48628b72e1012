"""Command-line entry points: ``iwm-train CONFIG [key=value ...]`` and ``iwm-eval RUN_DIR``."""
import argparse
import logging
import sys

from .config import ConfigError, load_config


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="[iwm-fast] %(message)s", stream=sys.stderr)


def train_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="iwm-train",
        description="Train IWM / I-JEPA. Overrides are dotted keys, e.g. train.steps=100 model.size=base "
                    "predictor.conditioning=none; see configs/ and README.md for all keys.")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    from .distributed import leave_process_group
    from .guard import NonFiniteLossError
    from .loop import train
    from .stop_signal import EXIT_CODE, StopRequested

    try:
        run_dir = train(cfg)
    except NonFiniteLossError as e:
        logging.getLogger("iwm_fast").error("%s", e)
        return 3
    except StopRequested as e:
        logging.getLogger("iwm_fast").warning("%s", e)
        return EXIT_CODE
    finally:
        leave_process_group()
    print(f"run directory: {run_dir}")
    return 0


def eval_main(argv=None):
    parser = argparse.ArgumentParser(prog="iwm-eval", description="Evaluate a finished or running IWM run: "
                                     "linear probe vs a random encoder, world-model MRR, loss-curve plot.")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's saved config (eval.*)")
    args = parser.parse_args(argv)
    _setup_logging()
    from .evaluate import evaluate_run

    try:
        evaluate_run(args.run_dir, overrides=args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
