"""Durable file-system steps shared by the checkpointer and the metrics log."""
import os


def fsync_dir(path):
    """Make a rename or a new file in ``path`` survive a power loss (the directory entry itself is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
