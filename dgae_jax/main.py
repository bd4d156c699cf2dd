"""Entry point: `python -m dgae_jax.main --config=configs/f16.py[:variants] --mode=...`.

Only flags, config loading and dispatch live here; each mode is an importable function.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

MODES = ("summary",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/f16.py or configs/f16.py:demo,c=8.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, images).")
_MODE = flags.DEFINE_enum("mode", "summary", MODES, "What to run.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if _MODE.value == "summary":
        from dgae_jax import summary
        summary.summarize(config)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
