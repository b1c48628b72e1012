"""One process of a test job: ``iwm_fast.train.loop.train`` on CONFIG and overrides, stopped after step
MAX_STEPS (0: none) as a kill right after it would leave the run. Usage, under torchrun or alone:
``python tests/train_until.py MAX_STEPS CONFIG [key=value ...]``."""
import logging
import sys

from iwm_fast.config import load_config
from iwm_fast.train.distributed import leave_process_group
from iwm_fast.train.loop import train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[iwm-fast] %(message)s", stream=sys.stderr)
    train(load_config(sys.argv[2], sys.argv[3:]), max_steps=int(sys.argv[1]) or None)
    leave_process_group()
