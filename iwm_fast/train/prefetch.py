"""Host-to-device copies that overlap the step before: the next micro-batch is copied while the current runs.

On CUDA the copy of batch k+1 is issued on a side stream as soon as batch k is handed out, from the pinned
memory the DataLoader filled, so it runs beside step k's kernels; the compute stream waits for it only when
batch k+1 is used. On the CPU batches are passed through.
"""
import torch


def _to(batch, device, non_blocking):
    # Only the pixels go to the device; labels and positions stay on the host, where the step reads them.
    return {**batch, "images": batch["images"].to(device, non_blocking=non_blocking)}


class DevicePrefetcher:
    """Wraps a batch stream with ``state_dict()``; its own ``state_dict()`` names the next batch it will hand
    out (not the one already fetched ahead), so a checkpoint resumes exactly."""

    def __init__(self, stream, device):
        self.stream, self.device = stream, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._next = None

    def _fetch(self):
        state = self.stream.state_dict()
        batch = next(self.stream)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                batch = _to(batch, self.device, non_blocking=True)
        return state, batch

    def __next__(self):
        if not self.cuda:
            return next(self.stream)
        if self._next is None:
            self._next = self._fetch()
        _, batch = self._next
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        batch["images"].record_stream(torch.cuda.current_stream(self.device))  # allocated on the copy stream
        self._next = self._fetch()
        return batch

    def state_dict(self):
        """The position to checkpoint: collective where the stream's is (``BatchStream.checkpoint_state``), so
        every rank calls it at a save."""
        local = self._next[0] if self._next is not None else self.stream.state_dict()
        gather = getattr(self.stream, "checkpoint_state", None)
        return gather(local) if gather is not None else local

    def close(self):
        self.stream.close()
