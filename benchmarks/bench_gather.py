"""Masked gather (+ fused pos add) forward/backward GB/s: iwm_fast vs torch.gather, against a D2D copy."""
from iwm_fast.bench.gather import main

if __name__ == "__main__":
    main()
