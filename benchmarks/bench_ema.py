"""EMA update GB/s: fused multi-tensor kernel vs torch._foreach_lerp_ and I-JEPA's loop, against a D2D copy."""
from iwm_fast.bench.ema import main

if __name__ == "__main__":
    main()
