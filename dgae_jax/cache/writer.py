"""Writing a latent cache's shards (format.py has the files): the host side of the caching job.

A thread takes the encoded batches the device loop enqueues, fetches them, drops the padding,
checks the ids, accumulates the float64 statistics and writes the records, so the device loop
never waits on the host. A shard is written to `<name>.array_record.tmp`, closed, re-read for its
ids, hashed, its sidecar written (tmp + rename), then renamed to `<name>.array_record`: a shard
file under its final name is always complete and described by its sidecar.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time

import jax
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from dgae_jax import progress
from dgae_jax.cache import format
from dgae_jax.cache.format import Shard


def _is_local(directory: epath.Path) -> bool:
    return "://" not in os.fspath(directory)


class ShardWriter:
    """Writes one shard's records in id order to a temporary file; `finish` hashes it, writes
    the sidecar and renames it into place. Bucket directories stage the file locally (the
    ArrayRecord writer needs a local path) and copy it up."""

    def __init__(self, directory: epath.Path, shard: Shard, ident: dict, dtype: np.dtype):
        self.directory, self.shard, self.ident, self.dtype = directory, shard, ident, dtype
        final = directory / shard.file
        if _is_local(directory):
            self.local_tmp = os.fspath(final) + ".tmp"
        else:
            self.local_tmp = os.path.join(tempfile.mkdtemp(prefix="dgae_cache_"), final.name)
        self.writer = ArrayRecordWriter(self.local_tmp, format.WRITER_OPTIONS)
        self.next_id, self.sums, self.missing = shard.start, None, []

    @property
    def full(self) -> bool:
        return self.next_id == self.shard.end

    def add(self, ids: np.ndarray, labels: np.ndarray, arrays: dict[str, np.ndarray],
            unreadable: np.ndarray) -> None:
        """The next ids in order: a record for each readable one; an unreadable image gets none
        and is listed in the sidecar (no other image's latents ever stand in for it)."""
        want = np.arange(self.next_id, self.next_id + len(ids))
        if not np.array_equal(ids, want) or want[-1] >= self.shard.end:
            raise RuntimeError(f"shard {self.shard.name}: got ids {ids.tolist()}, expected "
                               f"{want.tolist()} within [{self.shard.start}, {self.shard.end})")
        readable = ~unreadable
        self.missing += ids[unreadable].tolist()
        if readable.any():
            self.sums = format.add_sums(self.sums, format.partial_sums(
                arrays["mean"][readable], arrays["logvar"][readable]))
        stored = [arrays[k][readable].astype(self.dtype) for k in format.FIELDS if k in arrays]
        for j, (i, label) in enumerate(zip(ids[readable].tolist(), labels[readable].tolist())):
            self.writer.write(format.encode_record(i, label, [a[j] for a in stored]))
        self.next_id += len(ids)

    def finish(self) -> dict:
        """Checks the ids of the records actually in the file, then publishes the shard."""
        self.writer.close()
        s = self.shard
        reader = ArrayRecordReader(self.local_tmp)
        ids = [format.HEADER.unpack_from(r)[1] for r in reader.read_all()]
        reader.close()
        missing = set(self.missing)
        if ids != [i for i in range(s.start, s.end) if i not in missing]:
            raise RuntimeError(f"shard {s.name}: the file holds {len(ids)} records whose ids are "
                               f"not exactly [{s.start}, {s.end}) less {len(missing)} unreadable "
                               "images, in order")
        empty = np.zeros((0, self.ident["latent_shape"][-1]), np.float32)  # all unreadable
        sums = self.sums or format.partial_sums(empty, empty)
        meta = dict(self.ident, split=s.split, file=s.file, start=s.start, end=s.end,
                    count=len(ids), missing=self.missing,
                    sha256=format.file_sha256(self.local_tmp),
                    bytes=os.path.getsize(self.local_tmp),
                    sums={k: np.asarray(v).tolist() for k, v in sums.items()})
        format.write_json(self.directory / s.sidecar, meta)
        final = self.directory / s.file
        if _is_local(self.directory):
            os.replace(self.local_tmp, final)
        else:
            tmp = final.parent / (final.name + ".tmp")
            epath.Path(self.local_tmp).copy(tmp, overwrite=True)
            tmp.replace(final)
            os.remove(self.local_tmp)
            os.rmdir(os.path.dirname(self.local_tmp))
        return meta


class Writer:
    """The writer thread: fetches encoded batches, writes them into this process's pending
    shards in order, finishes shards and shows progress (progress.py). The device loop only
    enqueues (a bounded queue: at most `depth` batches in flight)."""

    def __init__(self, directory, pending: list[Shard], ident: dict, config, depth: int = 3):
        self.directory, self.ident, self.config = directory, ident, config
        self.dtype = format.DTYPES[config.cache.dtype]
        self.shards = iter(pending)
        self.total = sum(s.count for s in pending)
        self.current: ShardWriter | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name="latent-writer", daemon=True)
        self.error: BaseException | None = None
        self.batches = self.images = 0
        self.first = None  # (time, images) after the first batch: compile time excluded
        self.last_time = None

    def __enter__(self):
        self.meter = progress.bar(self.total, "cache_latents")
        self.thread.start()
        return self

    def put(self, outputs: dict, meta: dict) -> None:
        """Enqueues one batch: device `outputs` (posteriors) and the host `meta` of its rows
        ("id", "label", "split" as an index into ROLES, "mask" False for padding and
        unreadable images, "unreadable")."""
        if self.error is not None:
            raise RuntimeError("the latent writer thread failed") from self.error
        self.queue.put((outputs, meta))

    def __exit__(self, exc_type, exc, tb):
        self.queue.put(None)
        self.thread.join()
        self.meter.close()
        if exc_type is None and self.error is not None:
            raise RuntimeError("the latent writer thread failed") from self.error
        if exc_type is None and (self.current is not None or next(self.shards, None)):
            raise RuntimeError("the example stream ended before every planned shard was written")

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after a failure, keep draining so put() never blocks
                try:
                    self._write(*item)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def _write(self, outputs: dict, meta: dict) -> None:
        host = jax.device_get(outputs)
        keep = np.flatnonzero(meta["mask"] | meta["unreadable"])
        ids, labels, roles = meta["id"][keep], meta["label"][keep], meta["split"][keep]
        unreadable = meta["unreadable"][keep]
        arrays = {k: np.asarray(v)[keep] for k, v in host.items()}
        pos = 0
        while pos < len(keep):
            if self.current is None:
                shard = next(self.shards, None)
                if shard is None:
                    raise RuntimeError(f"example stream has more rows than planned (id {ids[pos]})")
                self.current = ShardWriter(self.directory, shard, self.ident, self.dtype)
            shard = self.current.shard
            part = slice(pos, pos + min(shard.end - self.current.next_id, len(keep) - pos))
            if np.any(roles[part] != format.ROLES.index(shard.split)):
                raise RuntimeError(f"rows of another split reached shard {shard.name}")
            self.current.add(ids[part], labels[part], {k: v[part] for k, v in arrays.items()},
                             unreadable[part])
            pos = part.stop
            if self.current.full:
                self.current.finish()
                logging.info("cache_latents: wrote %s (%d examples)", shard.name, shard.count)
                self.current = None
        self.batches += 1
        self.images += len(keep)
        self.last_time = time.time()
        if self.first is None:
            self.first = (self.last_time, self.images)
        self.meter.update(len(keep))

    def rate(self) -> float:
        """Images/s after the first batch (which includes compilation)."""
        if self.first is None or self.last_time <= self.first[0]:
            return 0.0
        return (self.images - self.first[1]) / (self.last_time - self.first[0])
