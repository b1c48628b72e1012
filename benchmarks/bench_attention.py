"""Attention fwd/bwd/fwd+bwd TFLOP/s and peak memory: fused Triton kernel vs SDPA backends, flash-attn, xformers."""
from iwm_fast.bench.attention import main

if __name__ == "__main__":
    main()
