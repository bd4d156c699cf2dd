"""Gaussian diffusion (DDPM) with DiT's recipe, for the latent DiT.

DiT (Peebles & Xie, 2023) trains with ADM's Gaussian diffusion (Nichol & Dhariwal, 2021;
github.com/openai/improved-diffusion): a linear beta schedule from 1e-4 to 0.02 over T = 1000
steps, the network predicting epsilon and, in its other C channels, v that sets the reverse
variance by interpolating log-variances between the posterior's and beta_t's
(log sigma^2 = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2); the loss is L_simple (the
mean squared epsilon error) plus the variational bound L_vlb in bits per dimension, the bound's
gradient reaching only the variance (the mean is frozen in it). It samples ancestrally on 250
timesteps respaced evenly out of the 1000 (ADM's `space_timesteps`). epsilon-VAE's and DGAE's
generation tables follow DiT, so this is the recipe to compare with them.

A `Schedule` holds ADM's per-step constants in float64 numpy, computed once on the host; they
enter jitted functions as constants. The network sees the original timestep index i through
time t = i / 1000, which the DiT's sinusoidal embedding scales back to i, as DiT feeds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddpm",)
SPACINGS = ("uniform",)
NETWORK_TIME_SCALE = 1000.0  # network time = index / 1000: the DiT embeds the index itself

OutputFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, network time (B,)) -> 2C channels


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
    """ADM's linear schedule, scaled by 1000 / T so that any T spans the same noise range."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """The constants of a Gaussian diffusion over `betas`; `timesteps[i]` is the original index
    (into the training schedule) that step i of this one stands for."""
    betas: np.ndarray
    timesteps: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "Schedule":
        return cls(np.asarray(betas, np.float64), np.arange(len(betas)))

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
        acp = np.cumprod(1.0 - b)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = b * (1.0 - acp_prev) / (1.0 - acp)
        consts = dict(
            alphas_cumprod=acp, alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=np.sqrt(acp), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
            posterior_variance=post_var,
            # log of the posterior variance, whose first entry (0) is replaced by the second's.
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=b * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - b) / (1.0 - acp),
            log_betas=np.log(b))
        for name, value in consts.items():
            object.__setattr__(self, name, value)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def respaced(self, steps: int) -> "Schedule":
        """`steps` of these timesteps, evenly spaced with ADM's rounding (0 and T - 1 included),
        and the betas that keep each kept step's alpha-bar (SpacedDiffusion). At least 2: the
        reverse variance at the last step borrows the posterior variance of the one before."""
        if not 2 <= steps <= self.num_steps:
            raise ValueError(f"cannot respace {self.num_steps} timesteps into {steps}")
        stride = (self.num_steps - 1) / (steps - 1)
        keep, position = set(), 0.0
        for _ in range(steps):  # accumulated as ADM does, so ties round the same way
            keep.add(round(position))
            position += stride
        keep = sorted(keep)
        acp = self.alphas_cumprod[keep]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return Schedule(betas, self.timesteps[keep])

    def network_time(self, index: jax.Array) -> jax.Array:
        """Network time of step `index` of this schedule: original index / 1000."""
        return jnp.asarray(self.timesteps / NETWORK_TIME_SCALE, jnp.float32)[index]


def _at(values: np.ndarray, index: jax.Array, like: jax.Array) -> jax.Array:
    """values[index] per example, broadcast against `like` (B, ...)."""
    v = jnp.asarray(values, jnp.float32)[index]
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def q_sample(s: Schedule, x0: jax.Array, index: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return (_at(s.sqrt_alphas_cumprod, index, x0) * x0
            + _at(s.sqrt_one_minus_alphas_cumprod, index, x0) * eps)


def q_posterior(s: Schedule, x0: jax.Array, x_t: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    mean = (_at(s.posterior_mean_coef1, index, x_t) * x0
            + _at(s.posterior_mean_coef2, index, x_t) * x_t)
    return mean, _at(s.posterior_log_variance_clipped, index, x_t) * jnp.ones_like(x_t)


def p_mean_variance(s: Schedule, output: jax.Array, x_t: jax.Array,
                    index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, log-variance and x0 estimate of p(x_{t-1} | x_t) from a 2C-channel output
    (epsilon, then the variance interpolation v in [-1, 1])."""
    eps_hat, v = jnp.split(output.astype(jnp.float32), 2, axis=-1)
    frac = (v + 1.0) / 2.0
    min_log = _at(s.posterior_log_variance_clipped, index, x_t)
    max_log = _at(s.log_betas, index, x_t)
    log_var = frac * max_log + (1.0 - frac) * min_log
    x0_hat = (_at(s.sqrt_recip_alphas_cumprod, index, x_t) * x_t
              - _at(s.sqrt_recipm1_alphas_cumprod, index, x_t) * eps_hat)
    mean, _ = q_posterior(s, x0_hat, x_t, index)
    return mean, log_var, x0_hat


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """ADM's tanh approximation of the standard normal CDF (kept for parity with its bound)."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array,
                                        log_scale: jax.Array) -> jax.Array:
    """log P(x) of a Gaussian discretised into 256 bins of width 2/255 over [-1, 1], the edge
    bins open (ADM's decoder term, which DiT applies to latents unchanged), in nats."""
    centred = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_term(s: Schedule, output: jax.Array, x0: jax.Array, x_t: jax.Array,
            index: jax.Array) -> jax.Array:
    """Per-example L_vlb term at step `index`, bits per dimension: KL(q(x_{t-1}|x_t, x0) ||
    p(x_{t-1}|x_t)) for index > 0, the decoder's negative log-likelihood of x0 at index 0."""
    true_mean, true_log_var = q_posterior(s, x0, x_t, index)
    mean, log_var, _ = p_mean_variance(s, output, x_t, index)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / np.log(2.0)
    return jnp.where(index == 0, nll, kl)


def training_losses(s: Schedule, output: jax.Array, x0: jax.Array, x_t: jax.Array,
                    index: jax.Array, eps: jax.Array) -> dict[str, jax.Array]:
    """Per-example `mse` (L_simple), `vb` (L_vlb, its gradient reaching only the variance
    channels) and `loss` = mse + vb: ADM's hybrid objective as DiT trains it."""
    eps_hat, v = jnp.split(output.astype(jnp.float32), 2, axis=-1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps_hat), v], axis=-1)
    mse = _mean_flat((eps - eps_hat) ** 2)
    vb = vb_term(s, frozen, x0, x_t, index)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def sample(output_fn: OutputFn, noise: jax.Array, schedule: Schedule,
           rng: jax.Array) -> jax.Array:
    """Ancestral sampling (ADM's p_sample_loop, no clipping) over every step of `schedule`,
    from x_T = noise; a `lax.scan`, so the network is traced once."""
    batch = noise.shape[0]

    def step(x, index):
        t = jnp.full((batch,), schedule.network_time(index))
        i = jnp.full((batch,), index)
        mean, log_var, _ = p_mean_variance(schedule, output_fn(x, t), x, i)
        z = jax.random.normal(jax.random.fold_in(rng, index), x.shape)
        return mean + jnp.where(index > 0, jnp.exp(0.5 * log_var), 0.0) * z, None

    x, _ = jax.lax.scan(step, noise.astype(jnp.float32),
                        jnp.arange(schedule.num_steps - 1, -1, -1))
    return x
