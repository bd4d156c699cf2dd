"""Entry point: `python -m dgae_jax.main --config=configs/f16.py[:variants] --workdir=DIR
[--mode=MODE]`. Flags, config validation and dispatch only: the modes are in `modes/`, the
tasks in `tasks/`.
"""

from __future__ import annotations

import importlib
import json
import logging as std_logging
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags


def import_tensorflow_quietly() -> None:
    """clu's TensorBoard writer imports TensorFlow, whose C++ side announces oneDNN (or the CPU
    instructions it was not built for) at import through absl logging, before any log setup and
    past TF_CPP_MIN_LOG_LEVEL: notices a user cannot act on. They are dropped; whatever else
    TensorFlow writes to stderr while importing is passed on."""
    notices = ("All log messages before absl::InitializeLog()", "port.cc:", "cpu_feature_guard",
               "To enable the following instructions", "rebuild TensorFlow with")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not any(n in line for n in notices):
                    print(line, file=sys.stderr)


import_tensorflow_quietly()  # before the project's modules, which import clu's writers

from dgae_jax import modes, parallel, validation  # noqa: E402
from dgae_jax.errors import ConfigError, DGAEError  # noqa: E402
from dgae_jax.tasks import registry  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/f16.py or configs/f16.py:demo,c=8.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, images).")
_MODE = flags.DEFINE_enum("mode", "train", tuple(modes.MODES), "What to run (see modes/__init__.py).")


def hide_accelerators_from_tensorflow() -> None:
    """clu's TensorBoard writer imports TensorFlow; keep it off the GPUs/TPUs JAX uses."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")


def quiet_library_logs() -> None:
    """Orbax and grain log every save and read at INFO, and JAX each backend it does not find
    (libtpu's on a CPU host); keep their warnings only."""
    noisy = ("/orbax/", "/grain/", "/tensorstore/")
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or not any(n in r.pathname for n in noisy))
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def run(config, mode: str, workdir: str | None, user_set: dict | None = None) -> dict | None:
    """Validates (config, mode) before anything else, completes the config with what the task
    takes from elsewhere (a student: its teacher run's networks, read through Orbax, which needs
    the distributed runtime up), validates the result, then runs the mode. `user_set`: the fields
    given on the command line (flat 'a.b' -> value)."""
    validation.validate(config, mode, workdir=workdir)  # no device, file or network work yet
    spec, devices = modes.MODES[mode], None
    if spec.target is not None:  # compiles for devices it does not run on
        devices = spec.target(config)
    elif spec.cluster:
        parallel.initialize_distributed()
        import jax
        devices = jax.devices()
    registry.task_class(config).complete_config(config, user_set or {})
    validation.validate(config, mode, workdir=workdir,
                        device_count=len(devices) if devices else None,
                        process_count=len({d.process_index for d in devices}) if devices else 1)
    if modes.MODES[mode].workdir:  # the modes that write TensorBoard files
        hide_accelerators_from_tensorflow()
    return modes.run(config, mode, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        given = flags.FLAGS["config"]
        record = run(_CONFIG.value, _MODE.value, _WORKDIR.value,
                     config_flags.get_override_values(given) if given.present else {})
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except DGAEError as e:  # every other error of the project's (errors.py): one line
        sys.exit(f"stopped: {e}")
    if record is not None:
        print(json.dumps(record))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a `--config.field` that the config does not have (ml_collections
    raises AttributeError or KeyError for it) as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
            e = e.args[0]
        field, _, hint = str(e.args[0] if e.args else e).partition("\n")
        sys.exit(f"config error: no field {field} in the config{f' ({hint})' if hint else ''}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
