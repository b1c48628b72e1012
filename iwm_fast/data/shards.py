"""WebDataset-style tar shards: each rank and worker reads its own shards front to back, resumable exactly.

A shard is a plain tar whose consecutive members sharing a key (the name up to its first dot) form a sample:
``000123.jpg`` (or ``.jpeg``/``.png``) and ``000123.cls`` (the label as decimal text), as ``iwm-make-shards``
writes them. The tar format is read with the standard library, not the ``webdataset`` package: a position
is then just (shard, sample ordinal), a resumed worker skips to it by reading only the 512-byte headers of
the samples before it (``tarfile`` seeks over their data), and nothing else sits between the file and the
decoder (no pipeline stages, no shuffle buffer whose contents a checkpoint would have to hold).

Order: each epoch the shards are permuted by ``(seed, epoch)``; rank r takes every W-th from r, and this
rank's stream s (one per DataLoader worker) every K-th of those from s. A stream reads its shards in that
order, samples in file order; batches are consecutive samples of one stream, and the DataLoader takes them
from the streams in turn. So a sample's place depends on the shard list, seed, world size and number of
streams (``data.num_workers``, at least 1), all recorded and checked on resume. Write shards from a shuffled
file list (``iwm-make-shards`` does) so that consecutive samples are not one class.

A sample's index (its crop key, with the seed and epoch) is ``shard_number << 32 | ordinal`` over the sorted
shard list. Unreadable samples (bad image, missing label) are skipped and named in a warning; a shard whose
tar structure breaks is left at that point with a warning, counting the samples its manifest says it lost.
All count once, in the epoch 0 pass.

A shard set is read only with its manifest (``iwm_fast.data.manifest``): without one, or with shards that
do not match it, it is refused. The checkpoint's position holds every rank's streams (``merge_states``).
"""
import io
import os
import tarfile
import warnings

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..transforms.seeding import generator
from .decode import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageWarning, decode_center_crop, decode_random_crop
from .manifest import shard_set
from .workers import ignore_stop_signals, shutdown, start_workers

IMAGE_KEYS = ("jpg", "jpeg", "png")
ORDINAL_BITS = 32
_SHARD_ORDER_SALT = 0x5A4D  # keys the shard permutation apart from the crops' (seed, epoch, index)


def list_shards(root):
    """Sorted tar paths of ``root`` (a folder, a tar file, or a comma-separated list of both), each checked
    against its folder's manifest (``iwm_fast.data.manifest.shard_set``)."""
    return list(shard_set(root).paths)


def too_few_shards(num_shards, world_size, streams):
    """Why ``num_shards`` cannot feed every loader stream of every rank (each reads its own shards), or None."""
    if num_shards >= world_size * streams:
        return None
    return (f"{num_shards} shards cannot feed {world_size} ranks x {streams} loader workers (each reads its own "
            f"shards); write at least {world_size * streams} shards (iwm-make-shards --shard-size) or lower "
            "data.num_workers")


def read_samples(path, start=0):
    """``(ordinal, key, {extension: bytes})`` for the samples of one tar from sample ``start`` on.

    Members before ``start`` are passed over by their headers only. Raises ``tarfile.TarError``/``OSError``
    where the tar's structure breaks.
    """
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        ordinal, key, group = 0, None, {}
        while True:
            m = tar.next()
            if m is None:
                break
            if not m.isfile():
                continue
            head, base = os.path.split(m.name)
            stem, _, ext = base.partition(".")
            k = f"{head}/{stem}" if head else stem
            if k != key:
                if key is not None:
                    if ordinal >= start:
                        yield ordinal, key, group
                    ordinal += 1
                key, group = k, {}
            if ordinal >= start:
                group[ext.lower()] = tar.extractfile(m).read()
            tar.members.clear()  # tarfile keeps every header it read; a shard may hold many thousands
        if key is not None and ordinal >= start:
            yield ordinal, key, group


def _named_bytes(data, name):
    b = io.BytesIO(data)
    b.name = name
    return b


class ShardDataset(IterableDataset):
    """Samples of this rank's shards; iterate it through ``ShardLoader`` (which sets the epoch and positions).

    Yields ``(item, stream, shard_k, next_ordinal, counts)``: ``item`` is ``(image uint8 [3, S, S], label,
    index)`` or None (skipped); ``(stream, shard_k, next_ordinal)`` is where this stream continues after it;
    ``counts`` is 1 for a skip that counts as a newly found unreadable sample.
    """

    def __init__(self, root, image_size, crop=True, seed=0, crop_scale=(0.3, 1.0), rank=0, world_size=1,
                 streams=1, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.shard_set = shard_set(root)
        self.paths = list(self.shard_set.paths)
        if len(self.paths) >= 1 << (63 - ORDINAL_BITS):
            raise ValueError(f"too many shards ({len(self.paths)})")
        if not 0 <= rank < world_size or streams < 1:
            raise ValueError(f"need 0 <= rank < world_size and streams >= 1, got {rank}, {world_size}, {streams}")
        problem = too_few_shards(len(self.paths), world_size, streams)
        if problem:
            raise ValueError(problem)
        self.root, self.image_size, self.crop, self.seed = root, image_size, bool(crop), int(seed)
        self.crop_scale, self.max_image_pixels = tuple(crop_scale), max_image_pixels
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.epoch, self.positions, self.rotation = 0, {}, 0

    decode_on_gpu = False  # set by iwm_fast.data.gpu_decode.enable

    def stream_shards(self, epoch, stream):
        """Shard numbers (into ``self.paths``) that ``stream`` of this rank reads in ``epoch``, in order."""
        perm = torch.randperm(len(self.paths), generator=generator(self.seed, epoch, _SHARD_ORDER_SALT)).tolist()
        return perm[self.rank::self.world_size][stream::self.streams]

    def decode(self, shard, ordinal, key, group, epoch):
        name = f"{self.paths[shard]}:{key}"
        data = next((group[k] for k in IMAGE_KEYS if k in group), None)
        try:
            label = int(group["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            label = None
        if data is None or label is None:
            what = ("it has no image member" if data is None else
                    "it has no .cls label (a readable image, but every sample needs its label)")
            warnings.warn(f"skipping shard sample {name}: {what}", UnreadableImageWarning, stacklevel=2)
            return None
        index = shard << ORDINAL_BITS | ordinal
        src = _named_bytes(data, name)
        if self.crop and self.decode_on_gpu:
            from .gpu_decode import crop_for_gpu

            img = crop_for_gpu(data, name, (self.image_size, self.image_size), scale=self.crop_scale,
                               generator=generator(self.seed, epoch, index), max_pixels=self.max_image_pixels)
        elif self.crop:
            img = decode_random_crop(src, self.image_size, scale=self.crop_scale,
                                     generator=generator(self.seed, epoch, index), max_pixels=self.max_image_pixels)
        else:
            img = decode_center_crop(src, self.image_size, max_pixels=self.max_image_pixels)
        return None if img is None else (img, label, index)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.streams:
            raise RuntimeError(f"ShardDataset built for {self.streams} streams is read by {workers} workers")
        stream = (worker + self.rotation) % workers
        epoch = self.epoch
        shards = self.stream_shards(epoch, stream)
        k0, o0 = self.positions.get(stream, (0, 0))
        for k in range(k0, len(shards)):
            sid = shards[k]
            reached = o0 if k == k0 else 0  # samples of this shard read so far
            try:
                for ordinal, key, group in read_samples(self.paths[sid], reached):
                    reached = ordinal + 1
                    yield self.decode(sid, ordinal, key, group, epoch), stream, k, reached, int(epoch == 0)
            except (tarfile.TarError, OSError, EOFError) as err:
                lost = max(0, self.shard_set.samples[sid] - reached)  # 0: it broke after its last sample
                warnings.warn(f"skipping the rest of broken shard {self.paths[sid]} after sample {reached}: "
                              f"{lost} of its {self.shard_set.samples[sid]} samples lost ({type(err).__name__}: "
                              f"{err})", UnreadableImageWarning, stacklevel=2)
                yield None, stream, k + 1, 0, lost * int(epoch == 0)
                continue
            if reached < self.shard_set.samples[sid]:  # cut at a member boundary: the tar reads as shorter
                lost = self.shard_set.samples[sid] - reached
                warnings.warn(f"shard {self.paths[sid]} ended after sample {reached}: {lost} of its "
                              f"{self.shard_set.samples[sid]} samples lost (truncated?)", UnreadableImageWarning,
                              stacklevel=2)
                yield None, stream, k + 1, 0, lost * int(epoch == 0)


_RANK_KEYS = ("epoch", "next_stream", "positions")


def identity_mismatch(saved, now):
    """What makes a saved shard position unusable under ``now`` (a ``_identity()``), or None."""
    def workers(streams):
        return "0 or 1" if streams == 1 else str(streams)

    for k, v in now.items():
        was = saved.get(k)
        if was == v or (k == "set_digest" and k not in saved):  # saved before positions named the contents
            continue
        if k == "world_size":
            return (f"the run's shard position was saved by {was} processes and this run has {v}: the shard "
                    f"order depends on the number of processes, so a shard run resumes on {was} processes only")
        if k == "streams":
            return (f"the run's shard position was saved with data.num_workers={workers(was)} and this run has "
                    f"data.num_workers={workers(v)}: the shard order depends on it; resume with "
                    f"data.num_workers={workers(was)}")
        if k in ("num_shards", "set_digest"):
            then = f"{was} shards then, {v} now" if k == "num_shards" else "other shard contents now"
            return (f"the shard set changed since the run's last checkpoint ({then}): the saved position would "
                    "point at other samples; restore the set as it was, or pick another train.out_dir")
        return f"the run's shard position was saved with {k}={was!r} but this run has {v!r}"
    return None


def collate_shard_items(items, image_size=None):
    """Stack one stream's samples; ``stream_position`` says where that stream goes on after the batch."""
    from .collate import collate_skip_bad

    batch = collate_skip_bad([it[0] for it in items], image_size)
    batch["stream_position"] = tuple(items[-1][1:4])
    batch["num_skipped"] = sum(it[4] for it in items if it[0] is None)  # a broken shard: the samples it lost
    return batch


class ShardLoader:
    """Endless-epoch iteration over a ``ShardDataset``: each ``for batch in loader`` is the rest of one epoch.

    ``state_dict()`` between batches names the exact next sample of every stream of this rank and the stream
    whose batch comes next; ``merge_states`` joins all ranks' into the checkpoint's position, from which
    ``start_state`` resumes each rank. Workers are started per epoch (their dataset copy carries the epoch
    and positions), and on resume worker w reads stream ``(w + next_stream) % K``, so that the DataLoader's
    in-order round robin, which starts at worker 0, continues the interrupted order. Workers ignore SIGTERM
    and SIGINT (``iwm_fast.data.workers``).
    """

    def __init__(self, dataset, batch_size, *, num_workers=0, start_state=None, pin_memory=None,
                 prefetch_factor=4):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max(1, num_workers) != dataset.streams:
            raise ValueError(f"the dataset has {dataset.streams} streams but the loader {num_workers} workers")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch, self.positions, self.next_stream = 0, {}, 0
        if start_state is not None:
            self.load_state_dict(start_state)

    def _identity(self):
        d = self.dataset
        return {"num_shards": len(d.paths), "seed": d.seed, "world_size": d.world_size, "streams": d.streams,
                "set_digest": d.shard_set.digest}

    def state_dict(self):
        """This rank's position (``merge_states`` of every rank's is what a checkpoint holds)."""
        return {"kind": "shards", "epoch": self.epoch, "next_stream": self.next_stream,
                "positions": {str(s): list(p) for s, p in self.positions.items()}, **self._identity()}

    @staticmethod
    def merge_states(states):
        """One position for the checkpoint from every rank's ``state_dict()`` (in rank order)."""
        identity = {k: v for k, v in states[0].items() if k not in _RANK_KEYS}
        return {**identity, "ranks": [{k: s[k] for k in _RANK_KEYS} for s in states]}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or state.get("kind") != "shards":
            raise ValueError("the checkpoint's data position is not a shard position (was the run trained on "
                             "another data.dataset?)")
        problem = identity_mismatch(state, self._identity())
        if problem:
            raise ValueError(problem)
        if "ranks" in state:  # else one rank's position, as checkpoints held before every rank's was kept
            state = {**state, **state["ranks"][self.dataset.rank]}
        self.epoch, self.next_stream = int(state["epoch"]), int(state["next_stream"])
        self.positions = {int(s): (int(p[0]), int(p[1])) for s, p in state["positions"].items()}

    def __iter__(self):
        from functools import partial

        from torch.utils.data import DataLoader

        ds = self.dataset
        ds.epoch, ds.positions, ds.rotation = self.epoch, dict(self.positions), self.next_stream
        extra = dict(prefetch_factor=self.prefetch_factor) if self.num_workers > 0 else {}
        if self.num_workers > 0:
            extra["worker_init_fn"] = ignore_stop_signals
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            collate_fn=partial(collate_shard_items, image_size=ds.image_size), **extra)
        self._batches = start_workers(loader)
        for batch in self._batches:
            stream, k, ordinal = batch.pop("stream_position")
            self.positions[stream] = (k, ordinal)
            self.next_stream = (stream + 1) % ds.streams
            yield batch
        self._batches = None
        self.epoch, self.positions, self.next_stream = self.epoch + 1, {}, 0

    def close(self):
        """Stop this epoch's workers (iterating again starts new ones)."""
        shutdown(getattr(self, "_batches", None))
        self._batches = None
