"""What a run does about images that cannot be read (`data.bad_images`).

One undecodable file among a million must not end a multi-day run at a random hour, and must not
pass unnoticed either. With 'skip' (the default) the training stream replaces an unreadable
image by the next readable one of the split (deterministically, so a resumed run sees the same
batches) and marks the example with the bad file's path; the trainer logs each path once,
appends it to `<workdir>/bad_images.txt`, counts them in `train/bad_images`, and stops with one
line naming the first ones when more than `data.max_bad_fraction` of the split is bad.
Evaluation leaves unreadable images out and reports how many (`unreadable_images`); the latent
cache never substitutes (an unreadable image stops the job naming it). With 'error' the first
unreadable image stops the run in one line.
"""

from __future__ import annotations

import threading

import numpy as np
from absl import logging

from dgae_jax.errors import BadImage, TooManyBadImages

POLICIES = ("skip", "error")


class SkipBadImages:
    """A source whose unreadable example i is replaced by the next readable one (i + 1, ...,
    wrapping), with `bad_path` naming the file of i ('' for a readable example)."""

    def __init__(self, source):
        self.source = source
        self._logged: set[str] = set()  # per process (and per grain worker process)
        self._lock = threading.Lock()  # grain reads with several threads

    def __getstate__(self):  # grain worker processes receive a pickled copy
        return {"source": self.source}

    def __setstate__(self, state):
        self.__init__(state["source"])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        bad_path = ""
        for k in range(len(self.source)):
            try:
                example = self.source[(i + k) % len(self.source)]
            except BadImage as error:
                if k == 0:
                    bad_path = error.path
                    with self._lock:
                        first = error.path not in self._logged
                        self._logged.add(error.path)
                    if first:
                        logging.warning("%s; training uses the next readable image in its place",
                                        error)
                continue
            return dict(example, bad_path=bad_path)
        raise BadImage(repr(self.source), "no image of the split can be read")

    def __repr__(self) -> str:
        return f"SkipBadImages({self.source!r})"


class BadImageLog:
    """The trainer's record of replaced images: `add` each local batch's `bad_path` (host
    strings, no device sync), `flush` at log steps (the file and the count; the limit is checked
    on the total over processes, so every process stops at the same step)."""

    def __init__(self, path, split_size: int, max_fraction: float, count_all=None):
        self.path, self.split_size, self.max_fraction = path, split_size, max_fraction
        self.count_all = count_all or (lambda n: n)  # local count -> count over processes
        self.seen: dict[str, None] = {}  # insertion-ordered set
        self.unwritten: list[str] = []

    def add(self, bad_paths) -> None:
        for p in np.asarray(bad_paths).ravel().tolist():
            if p and p not in self.seen:
                self.seen[p] = None
                self.unwritten.append(p)

    def flush(self) -> int:
        """Appends new paths to the file; returns the count over processes; raises
        TooManyBadImages above the allowed fraction."""
        if self.unwritten:
            with self.path.open("a") as f:
                f.write("".join(p + "\n" for p in self.unwritten))
            self.unwritten = []
        total = int(self.count_all(len(self.seen)))
        if total > self.max_fraction * self.split_size:
            first = ", ".join(list(self.seen)[:3])
            raise TooManyBadImages(
                f"{total} of the {self.split_size} training images cannot be read, more than "
                f"data.max_bad_fraction={self.max_fraction}; first: {first} (all in {self.path})")
        return total
