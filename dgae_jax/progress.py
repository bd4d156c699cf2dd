"""Progress of the long modes (eval, sweep, sample, cache_latents, reconstruct, fid, the API).

On a terminal, a tqdm bar with rate and ETA. Anywhere else (a log file, a batch job, a pipe),
tqdm's same meter as a plain log line at most every `every_s` seconds and once at the end, so a
job's log shows how far it is without carriage-return debris. Only process 0 reports.
"""

from __future__ import annotations

import sys

import jax
from absl import logging
from tqdm.auto import tqdm

EVERY_S = 30.0


class _LogLines:
    """A file-like target for tqdm that turns each refresh of the meter into one log line."""

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            logging.info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "image", *, every_s: float = EVERY_S,
        terminal: bool | None = None, quiet: bool = False) -> tqdm:
    """A tqdm progress meter over `total` units (`update(n)` as work completes; a context
    manager). `terminal` defaults to whether stderr is one; `quiet` shows nothing (work too
    short to report)."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    common = dict(total=total, desc=desc, unit=unit, leave=True,
                  disable=quiet or jax.process_index() > 0)
    if terminal:
        return tqdm(**common, dynamic_ncols=True)
    return tqdm(**common, file=_LogLines(), mininterval=every_s, maxinterval=every_s,
                ncols=80, ascii=True)
