"""Run every benchmark: ``python benchmarks/run.py --quick`` (same as ``iwm-bench``; see iwm_fast/bench/run.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iwm_fast.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
