"""Benchmarks of iwm-fast. Each module ``X`` exposes ``run(device, quick) -> list[dict]`` rows for the CSV."""
