"""Test doubles for the trainer: a DiT task on random stored posteriors (no cache on disk, no
decoding) and variants of it that fail or narrate, a batch stream that records ids and can send
SIGTERM, and a small mesh. The fault tests' subprocess scripts import the variants from here."""

import os
import signal
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dgae_jax import config_lib, parallel
from dgae_jax.cache import reader
from dgae_jax.data import pipeline
from dgae_jax.tasks.ldm import LatentDiffusionTask


def mesh_of(data, fsdp):
    devices = jax.devices()[:data * fsdp]
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)), devices)


class HookedIterator(grain.DatasetIterator):
    """Hands out the inner iterator's batches, calling `hook(count, batch)` on each (count from
    1); its state is the inner iterator's, so checkpoints and resumes see the real stream."""

    def __init__(self, inner, hook):
        super().__init__(inner)
        self._inner, self._hook, self._count = inner, hook, 0

    def __next__(self):
        batch = next(self._inner)
        self._count += 1
        self._hook(self._count, batch)
        return batch

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)


class HookedStream:
    """A task's train_data result whose every iterator is a HookedIterator."""

    def __init__(self, dataset, hook):
        self.dataset, self.hook = dataset, hook

    def __iter__(self):
        return HookedIterator(iter(self.dataset), self.hook)


def recording(task_cls):
    """`task_cls` whose training stream records the batch ids it yields (and can send SIGTERM)."""

    class Recording(task_cls):
        def __init__(self, config, signal_at=None):
            super().__init__(config, "train")
            self.log, self.signal_at = [], signal_at

        def train_data(self, process_index, process_count):
            def record(count, batch):
                self.log.append(batch["id"].tolist())
                if len(self.log) == self.signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return HookedStream(super().train_data(process_index, process_count), record)

    return Recording


class NoEvaluation:
    def evaluate(self, params, step):
        return {}


class SyntheticLatentTask(LatentDiffusionTask):
    """The DiT task on 24 random stored posteriors instead of a cache on disk (the data path from
    the posteriors on is the task's own); its evaluation decodes nothing."""

    def __init__(self, config, mode="train"):
        super().__init__(config, "summary")
        rng = np.random.default_rng(0)
        shape = self.model.latent_shape
        self.examples = [{"mean": rng.standard_normal(shape).astype(np.float32),
                          "logvar": np.full(shape, -2.0, np.float32),
                          "label": np.int32(i % 4), "id": np.int64(i)} for i in range(24)]

    def train_data(self, process_index, process_count):
        op = reader.SampleLatent(np.zeros(16, np.float32), np.ones(16, np.float32))
        return pipeline.epoch_batches(grain.MapDataset.source(self.examples), self.config,
                                      process_index, process_count, op)

    def evaluator(self, run):
        return NoEvaluation()


class PoisonedTask(SyntheticLatentTask):
    """The synthetic DiT task whose loss is NaN at the given (0-based) state steps."""

    def __init__(self, config, poison=()):
        super().__init__(config)
        self.poison = jnp.asarray(sorted(poison) or [-1])

    def loss_fn(self, model, params, batch, rng, step):
        loss, metrics = super().loss_fn(model, params, batch, rng, step)
        nan = jnp.where(jnp.any(self.poison == step), jnp.nan, 0.0)
        return loss + nan, dict(metrics, loss=metrics["loss"] + nan)


class FailingData(SyntheticLatentTask):
    """The synthetic DiT task whose data stream raises at batch `fail_at`."""

    def __init__(self, config, fail_at):
        super().__init__(config)
        self.fail_at = fail_at

    def train_data(self, process_index, process_count):
        def fail(count, batch):
            if count == self.fail_at:
                raise OSError(f"cannot read shard 7 (batch {count})")
        return HookedStream(super().train_data(process_index, process_count), fail)


class NarratedTask(SyntheticLatentTask):
    """The synthetic DiT task telling a watching test what it does: `BATCH i` as batch i is
    handed out, `EVAL step` as an evaluation starts (which then lasts a moment)."""

    def train_data(self, process_index, process_count):
        return HookedStream(super().train_data(process_index, process_count),
                            lambda count, batch: print(f"BATCH {count}", flush=True))

    def evaluator(self, run):
        class Slow:
            def evaluate(self, params, step):
                print(f"EVAL {step}", flush=True)
                time.sleep(0.5)
                return {}
        return Slow()


def ldm_train_config():
    cfg = config_lib.ldm_config("demo")
    cfg.model.update(hidden=32, depth=2, heads=2, num_classes=4)
    cfg.update(batch_size=8, total_steps=6, log_every=2, eval_every=1000, checkpoint_every=4)
    cfg.optimizer.warmup_steps = 1
    cfg.ema_decay = 0.9
    return cfg

