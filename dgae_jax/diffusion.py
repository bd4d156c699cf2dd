"""Rectified flow: time sampling, the data-noise path, and ODE samplers.

Path  x_t = (1 - t) x + t eps,  t in [0, 1] (t = 0 data, t = 1 noise);
velocity target  v = eps - x;  one-step clean estimate  x0_hat = x_t - t v_hat.
The paper writes its loss as denoising score matching but gives x0' = x_t - t v, which holds
exactly on this path (and is epsilon-VAE's Eq. 9). Samplers integrate dx/dt = v from t = 1 to
t = 0 and are pure functions of a velocity function, so the autoencoder's decoder and the latent
DiT share them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIME_SAMPLINGS = ("logit_normal", "uniform")
SAMPLERS = ("euler", "heun")
SPACINGS = ("uniform", "reversed_log")

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t of shape (B,)) -> v_hat


def sample_time(rng: jax.Array, batch: int, kind: str = "logit_normal", loc: float = 0.0,
                scale: float = 1.0) -> jax.Array:
    """Training times, shape (batch,).

    `logit_normal`: t = sigmoid(loc + scale * n), n ~ N(0, 1) (SD3 / epsilon-VAE; favours the
    middle of the path). `uniform`: t ~ U(0, 1).
    """
    if kind == "logit_normal":
        return jax.nn.sigmoid(loc + scale * jax.random.normal(rng, (batch,)))
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,))
    raise ValueError(f"time sampling {kind!r} is not one of {TIME_SAMPLINGS}")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x + t eps, with per-example t of shape (B,)."""
    t = _bcast(t, x)
    return (1 - t) * x + t * eps


def velocity_target(x: jax.Array, eps: jax.Array) -> jax.Array:
    return eps - x


def clean_estimate(x_t: jax.Array, t: jax.Array, v_hat: jax.Array) -> jax.Array:
    """x0_hat = x_t - t v_hat: the one-step reconstruction LPIPS is computed on."""
    return x_t - _bcast(t, x_t) * v_hat


def time_grid(steps: int, spacing: str = "uniform") -> jax.Array:
    """steps + 1 times from 1 (noise) down to 0 (data).

    `reversed_log` is epsilon-VAE's Eq. 12 with m = 1, n = 100:
    t(u) = log(100 - 99 u) / log(100) for u = i / steps, which takes small steps near the noise
    end and large ones near the data end.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = jnp.linspace(0.0, 1.0, steps + 1)
    if spacing == "uniform":
        return 1.0 - u
    if spacing == "reversed_log":
        m, n = 1.0, 100.0
        return (jnp.log(m) - jnp.log(u * (m - n) + n)) / (jnp.log(m) - jnp.log(n))
    raise ValueError(f"time spacing {spacing!r} is not one of {SPACINGS}")


UNROLL_STEPS = 2  # the distilled student's step counts


def settings(section, steps: int | None = None, sampler: str | None = None,
             spacing: str | None = None) -> dict:
    """{'steps', 'sampler', 'spacing'} of a sampling run: each given value, else the `diffusion`
    config section's (`sample_steps`, `sampler`, `spacing`)."""
    return {"steps": section.sample_steps if steps is None else steps,
            "sampler": sampler or section.sampler, "spacing": spacing or section.spacing}


def nfe(steps: int, sampler: str) -> int:
    """Velocity-network evaluations of one `sample`: Euler one per step; Heun two per step, the
    last included (the corrector is evaluated at t = 0 too)."""
    return steps * {"euler": 1, "heun": 2}[sampler]


def integrate_step(v: Callable, x, t, t_next, sampler: str):
    """One Euler or Heun step of dx/dt = v(x, t) from t to t_next. Plain arithmetic on whatever
    arrays `v` returns, so the tiled decode (tiling.py) takes the same step on the host."""
    dt = t_next - t
    v1 = v(x, t)
    x_euler = x + dt * v1
    if sampler == "euler":
        return x_euler
    return x + dt * 0.5 * (v1 + v(x_euler, t_next))


def sample(velocity_fn: VelocityFn, noise: jax.Array, steps: int, sampler: str = "euler",
           spacing: str = "uniform") -> jax.Array:
    """Integrate dx/dt = v(x, t) from x_1 = noise to t = 0.

    Euler uses one velocity evaluation per step, Heun (2nd-order trapezoid) two. The loop is a
    `lax.scan`, so the network is traced once whatever the number of steps; up to
    UNROLL_STEPS steps it is unrolled, which is what makes differentiating through a short
    trajectory (distill.py) affordable: XLA:CPU differentiates the body of a while loop an
    order of magnitude slower than the same body unrolled.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    times = time_grid(steps, spacing)
    batch = noise.shape[0]

    def v(x, t):
        return velocity_fn(x, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)

    def step(x, ts):
        return integrate_step(v, x, *ts, sampler), None

    x = noise.astype(jnp.float32)
    if steps <= UNROLL_STEPS:  # a Python loop: lax.scan keeps a while loop even when unrolled
        for i in range(steps):
            x, _ = step(x, (times[i], times[i + 1]))
        return x
    x, _ = jax.lax.scan(step, x, (times[:-1], times[1:]))
    return x
