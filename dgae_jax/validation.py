"""One check of a (config, mode) before any file, device or network work: every field that can be
judged from the config (and the device and process counts) is judged at start-up, so a bad value
stops the run with one line naming the field, never hours in. Checks that need the data itself (a
split's size, a corrupt file) stay where the data is read.

This module judges what every run shares (the task and mode pair, --workdir, the training loop,
the mesh, sharding rules, eval.tag); the task judges its own sections (`Task.check_config`) and
the mode the section it owns (`Mode.check`).
"""

from __future__ import annotations

import math
import re

import ml_collections

from dgae_jax import checks
from dgae_jax.checks import require
from dgae_jax.errors import ConfigError
from dgae_jax.modes import MODES
from dgae_jax.tasks import registry


def validate(config: ml_collections.ConfigDict, mode: str, *, workdir: str | None = None,
             device_count: int | None = None, process_count: int = 1) -> None:
    """Raises ConfigError naming the first bad field. `device_count` and `process_count` (known
    once the distributed runtime is up) check the mesh and the batch split."""
    task = registry.task_class(config)
    spec = MODES[mode]
    require(config.task in spec.tasks, f"--mode={mode} does not apply to task={config.task!r} "
            f"(its modes: {', '.join(n for n, m in MODES.items() if config.task in m.tasks)})")
    if spec.workdir:
        require(bool(workdir), f"--workdir is required for --mode={mode}")
        checks.writable(workdir, "--workdir")
    require(not spec.one_process or process_count == 1,
            f"--mode={mode} runs in one process (it has {process_count}); it uses every device "
            "of that process")
    _training(config)
    _mesh(config, device_count, process_count)
    _sharding_rules(config)
    tag = config.eval.get("tag", "")
    require(isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.-]*", tag) is not None,
            f"eval.tag={tag!r} must be letters, digits, '_', '.' or '-' (it names files)")
    task.check_config(config, mode)
    if spec.check is not None:
        spec.check(config, device_count)


def _training(config) -> None:
    checks.positive(config, "total_steps", "batch_size", "log_every", "eval_every",
                    "checkpoint_every", "checkpoint_keep", "max_nonfinite_steps")
    checks.not_negative(config, "checkpoint_keep_every")
    require(0 <= config.ema_decay < 1, f"ema_decay={config.ema_decay} is not in [0, 1)")
    window = tuple(config.get("profile_steps") or ())
    require(not window or (len(window) == 2 and 0 <= window[0] < window[1]),
            f"profile_steps={window} is not () or (start, end) with 0 <= start < end")
    o = config.optimizer
    checks.not_negative(config, *(f"optimizer.{f}" for f in ("lr", "end_lr", "warmup_steps",
                                                               "weight_decay", "clip_norm")))
    for field in ("b1", "b2"):
        require(0 <= o[field] < 1, f"optimizer.{field}={o[field]} is not in [0, 1)")
    checks.positive(config, "optimizer.eps")
    checks.not_negative(config, "data.workers", "data.prefetch")


def _mesh(config, device_count: int | None, process_count: int) -> None:
    shape = [config.mesh.data, config.mesh.fsdp]
    for name, n in zip(("mesh.data", "mesh.fsdp"), shape):
        require(n == -1 or n > 0, f"{name}={n} must be positive or -1 (the remaining devices)")
    require(shape.count(-1) <= 1, "mesh: only one of mesh.data and mesh.fsdp may be -1")
    slices = config.mesh.get("dcn_data", 1)
    require(slices > 0, f"mesh.dcn_data={slices} must be positive")
    require(config.batch_size % process_count == 0,
            f"batch_size={config.batch_size} is not divisible by the {process_count} processes")
    if device_count is None:
        return
    known = math.prod(n for n in shape if n != -1)
    require(device_count % known == 0 and (-1 in shape or known == device_count),
            f"mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} does not fit the "
            f"{device_count} devices")
    require(config.batch_size % device_count == 0, f"batch_size={config.batch_size} (global) is "
            f"not divisible by the {device_count} devices")
    data = shape[0] if shape[0] != -1 else device_count // shape[1]
    require(data % slices == 0,
            f"mesh.data={data} is not divisible by mesh.dcn_data={slices} (slices)")


def _sharding_rules(config) -> None:
    for i, rule in enumerate(config.sharding.rules):
        require(isinstance(rule, (tuple, list)) and len(rule) == 2,
                f"sharding.rules[{i}]={rule!r} is not a (regex, rule) pair")
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as e:
            raise ConfigError(f"sharding.rules[{i}]: {rule[0]!r} is not a regex ({e})") from None
        require(rule[1] in ("fsdp", "replicate") or isinstance(rule[1], (tuple, list)),
                f"sharding.rules[{i}]: {rule[1]!r} is not 'fsdp', 'replicate' or a "
                "PartitionSpec tuple")
