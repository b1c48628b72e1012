"""The training engine: the FSDP2 loop, checkpoints and the CLI (the run config is ``iwm_fast.config``)."""
