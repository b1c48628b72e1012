"""The training engine: config, the FSDP2 loop, checkpoints and the CLI."""
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
