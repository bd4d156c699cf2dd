"""What every config shares: variant parsing, and the fields of a training run that every task
has (logging, checkpoints, EMA, the mesh and sharding rules, the benchmark, the data loader)."""

from __future__ import annotations

import ml_collections

from dgae_jax.errors import ConfigError


def parse_variants(arg: str | None, known: tuple[str, ...]) -> dict[str, str]:
    """'c=8,size=M,demo' -> {'c': '8', 'size': 'M', 'demo': ''}; unknown keys are an error."""
    out = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise ConfigError(f"unknown config variant {key!r}; known: {', '.join(known)}")
        out[key] = value
    return out


def run_fields(c: ml_collections.ConfigDict) -> None:
    """Sets the fields of the training loop and its machinery that every task's config has, at
    their defaults; the task's builder then sets its own schedule and optimiser."""
    c.seed = 0
    c.log_every = 100
    c.checkpoint_keep = 3  # the latest N ...
    c.profile_steps = ()  # (start, end): a jax.profiler trace of those steps in <workdir>/profile
    c.benchmark = default_benchmark_config()
    # --mode=compile (modes/compile_tpu.py): a Cloud TPU accelerator type (v5p-32, v5litepod-16,
    # v6e-16, ...) or a libtpu topology (v5e:4x4), num_slices of it (multislice: mesh.dcn_data),
    # and the executables compiled, comma-separated ("" = all the config has).
    c.compile = dict(topology="", num_slices=1, executables="")
    c.max_nonfinite_steps = 20  # non-finite steps in a row (each skipped) before the run stops
    c.restore_fallback = True  # a corrupt checkpoint: resume from the newest intact one
    # -1: all remaining devices; dcn_data: slices the data axis spans (multislice), fsdp stays
    # inside a slice.
    c.mesh = dict(data=-1, fsdp=1, dcn_data=1)
    c.sharding = dict(rules=((".*", "fsdp"),), min_fsdp_size=2**18)


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` fields with their defaults (the paper's ImageNet recipe)."""
    return ml_collections.ConfigDict(dict(
        name="tfds:imagenet2012",   # "embedded" | "folder" | "tfds:<tfds name>"
        train_split="train",
        eval_split="validation",
        dir="",                     # folder root, or TFDS data_dir ("" -> TFDS_DATA_DIR / default)
        crop="resize_random",       # "resize_random" | "random_resized"
        min_scale=0.25,             # random_resized: smallest crop side / shorter image side
        flip=True,                  # random horizontal flips in training
        eval_subset="",             # fixed eval images: a named list ("imagenet_val_5k") or a
                                    # file of file names; "" = the eval split in its order
        eval_size=0,                # first N eval examples (of the subset); 0 = all of them
        eval_crops=8,               # embedded only: fixed eval crops per held-out photo ...
        eval_crop_seed=0,           # ... and the seed of their positions (another seed gives
                                    # other crops of the same photos, e.g. to choose settings)
        workers=0,                  # grain worker processes; 0 = threads in this process
        prefetch=2,                 # batches buffered ahead (threads) / per worker (processes)
        bad_images="skip",          # unreadable images: "skip" (replace, log, count) | "error"
        max_bad_fraction=0.001,     # "skip": stop when more of the train split is unreadable
    ))


def default_benchmark_config() -> ml_collections.ConfigDict:
    """`--mode=benchmark` (modes/benchmark.py): which components, how many timed calls, what batch."""
    return ml_collections.ConfigDict(dict(
        steps=10,            # timed calls of each component; 0 = compile and memory only
        components="",       # comma-separated, e.g. "unet,decode_25"; "" = all it has
        batch_size=0,        # global batch of the inference components; 0 = batch_size
        decode_steps=(1, 4, 25),  # DGAE decodes timed, in flow steps
    ))
