"""Time per batch of multi-block masks: I-JEPA's loop algorithm vs our Python fallback, C++ CPU and CUDA ops."""
from iwm_fast.bench.masks import main

if __name__ == "__main__":
    main()
