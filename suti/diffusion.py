"""Gaussian diffusion: noise schedules, the training loss, guided DDPM / DDIM samplers.

Pure functions over a `Schedule` pytree; the denoiser is any function

  denoise_fn(params, x_t, t, cond) -> prediction        (same shape as x_t)

  x_t:  float32 [B, H, W, C], the noisy image; clean images live in [-1, 1].
  t:    int32 [B], the *training* timestep in [0, T), T = config.diffusion.timesteps.
        t = 0 is the least noisy step (alpha_bar_0 = 1 - beta_0), t = T - 1 is ~pure noise.
        Respaced samplers still pass training timesteps, so one model serves every step count.
        The UNet embeds t itself (e.g. sinusoidally, on t or t / T).
  cond: any pytree of arrays with leading batch axis B (text embeddings, demonstrations...).
  prediction: what the model outputs, `config.diffusion.prediction`: 'eps' (the noise),
        'x0' (the clean image) or 'v' (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho).

Guidance convention (`guided_prediction`): conditions c_0 (unconditional), c_1, ..., c_n and
weights w_1..w_n give eps = eps(c_0) + sum_i w_i (eps(c_i) - eps(c_{i-1})). Weight 1 everywhere
means no guidance (the output is eps(c_n)); w_i = 0 ignores what c_i adds to c_{i-1}. With
two conditions this is Imagen's eps_u + w (eps_c - eps_u): SuTI's "guidance 30" (experts) is
weights=[30.] and the apprentice's "guidance 15" is weights=[15.] (or one weight per condition
once it guides text and demonstrations separately). Ho & Salimans write (1 + w') eps_c - w' eps_u:
their w' is our w - 1.

Schedules are built in float64 numpy, eagerly, then stored as float32. `sample` respaces
eagerly too: give it a concrete schedule (close over it inside your own jit / vmap), or respace
beforehand and pass steps=None.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from suti.config_lib import PREDICTIONS, SAMPLERS, SCHEDULES

THRESHOLDS = ("dynamic", "static", "none")

DenoiseFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@flax.struct.dataclass
class Schedule:
  """Per-step diffusion coefficients, each float32 [S] (S = T, or fewer once respaced).

  Index i of every array is step i of *this* schedule; `timesteps[i]` is the training timestep
  the model is called with at that step (identity unless respaced).
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array  # multiplies x0 in the mean of q(x_{t-1} | x_t, x0)
  posterior_mean_coef2: jax.Array  # multiplies x_t
  timesteps: jax.Array             # int32 [S]

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def _from_alphas_cumprod(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> Schedule:
  """All coefficients from alpha_bar (float64), as in DDPM / improved-DDPM."""
  ac = np.asarray(alphas_cumprod, np.float64)
  ac_prev = np.append(1.0, ac[:-1])
  betas = 1.0 - ac / ac_prev
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # post_var[0] is 0; its log is only used where noise is masked out, so borrow step 1's.
  if len(ac) > 1:
    post_var_for_log = np.append(post_var[1], post_var[1:])
  else:
    post_var_for_log = post_var
  post_logvar = np.log(np.maximum(post_var_for_log, 1e-20))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(post_logvar),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)),
      timesteps=jnp.asarray(timesteps, jnp.int32))


def make_schedule(kind: str, timesteps: int) -> Schedule:
  """'cosine' (Nichol & Dhariwal 2021) or 'linear' (Ho et al. 2020) over `timesteps` steps."""
  if kind == "cosine":
    s = 0.008
    f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + s) / (1 + s)
               * np.pi / 2) ** 2
    # Clip as in improved-DDPM: the last beta would be 1 and make x_T carry no signal at all.
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
  elif kind == "linear":
    scale = 1000.0 / timesteps  # keeps alpha_bar_T ~ 4e-5 for any T (improved-DDPM)
    betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
  else:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
  return _from_alphas_cumprod(np.cumprod(1.0 - betas), np.arange(timesteps))


def from_config(config) -> Schedule:
  """The training schedule of `config.diffusion`."""
  return make_schedule(config.diffusion.schedule, config.diffusion.timesteps)


def respace(schedule: Schedule, num_steps: int | None) -> Schedule:
  """Keeps `num_steps` evenly spaced steps (always the last and, if S > 1, the first).

  alpha_bar is unchanged at the kept steps and the betas are re-derived between them, so the
  respaced chain is a valid shorter diffusion. None or T returns the schedule unchanged.
  Runs in numpy, eagerly: call it outside jit (`sample` does).
  """
  total = schedule.num_steps
  if num_steps is None or num_steps == total:
    return schedule
  if not 1 <= num_steps <= total:
    raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
  # The float32 alpha_bar is what training noised with (q_sample), so it is the chain to keep.
  ac = np.asarray(schedule.alphas_cumprod, np.float64)
  # Counted down from T - 1 so that even one step starts from noise; distinct since S <= T.
  keep = np.round(np.linspace(total - 1, 0, num_steps)).astype(np.int64)[::-1]
  return _from_alphas_cumprod(ac[keep], np.asarray(schedule.timesteps)[keep])


def _at(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """coef[t] for a batch of step indices, shaped to broadcast against x [B, ...]."""
  return coef[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))


# ---------------------------------------------------------------- forward process and targets
# Here t indexes the schedule's arrays (the training timestep for a schedule that is not
# respaced, which is all that training uses).

def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, a_t = alpha_bar[t]."""
  return (_at(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def prediction_target(schedule: Schedule, prediction: str, x0, noise, t):
  """What a `prediction`-model should output for x_t = q_sample(x0, t, noise)."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    return (_at(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)
  raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_from_x0(schedule: Schedule, x_t, t, x0):
  """The noise that takes x0 to x_t at step t."""
  return ((x_t - _at(schedule.sqrt_alphas_cumprod, t, x_t) * x0)
          / _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))


def x0_from_eps(schedule: Schedule, x_t, t, eps):
  """The clean image x_t came from, given its noise."""
  return ((x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
          / _at(schedule.sqrt_alphas_cumprod, t, x_t))


def to_eps_x0(schedule: Schedule, prediction: str, out, x_t, t):
  """Any model output -> (eps, x0) at x_t. All three maps are affine in `out`."""
  sa = _at(schedule.sqrt_alphas_cumprod, t, x_t)
  s1a = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
  if prediction == "eps":
    return out, (x_t - s1a * out) / sa
  if prediction == "x0":
    return (x_t - sa * out) / s1a, out
  if prediction == "v":
    # sa^2 + s1a^2 = 1, so v-prediction inverts without dividing by a vanishing alpha.
    return s1a * x_t + sa * out, sa * x_t - s1a * out
  raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


# ---------------------------------------------------------------------------- training loss

def loss_at(schedule: Schedule, denoise_fn: DenoiseFn, params, x0, cond, t, noise,
            prediction: str = "eps"):
  """Per-example MSE [B] at given steps and noise (w_t = 1, as in SuTI / Imagen)."""
  x_t = q_sample(schedule, x0, t, noise)
  out = denoise_fn(params, x_t, schedule.timesteps[t], cond)
  err = (out - prediction_target(schedule, prediction, x0, noise, t)) ** 2
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def diffusion_loss(schedule: Schedule, denoise_fn: DenoiseFn, params, x0, cond, rng,
                   prediction: str = "eps", reduce: bool = True, *,
                   high_noise_fraction: float = 0.0, high_noise_from: float = 0.5,
                   weight_cap: float = 1.0):
  """Denoising loss with t ~ U[0, T) and noise ~ N(0, I); the batch mean, or [B] if not reduce.

  Pure in (params, x0, cond, rng): compose with jax.grad, and jax.vmap over a pack of experts.
  The defaults are SuTI's / Imagen's loss. The first round(high_noise_fraction * B) examples
  draw t from [high_noise_from * T, T) instead; weight_cap > 1 weights each example by
  min(1 / alpha_bar_t, weight_cap) (for an eps model, uncapped, that is the v loss).
  """
  t_rng, n_rng = jax.random.split(rng)
  batch, steps = x0.shape[0], schedule.num_steps
  t = jax.random.randint(t_rng, (batch,), 0, steps)
  num_high = int(round(high_noise_fraction * batch))
  if num_high:
    high = jax.random.randint(jax.random.fold_in(rng, 1), (batch,),
                              int(high_noise_from * steps), steps)
    t = jnp.where(jnp.arange(batch) < num_high, high, t)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  losses = loss_at(schedule, denoise_fn, params, x0, cond, t, noise, prediction)
  if weight_cap > 1.0:
    losses = losses * jnp.minimum(1.0 / schedule.alphas_cumprod[t], weight_cap)
  return jnp.mean(losses) if reduce else losses


# ------------------------------------------------------------------------------- guidance

def guided_prediction(denoise_fn: DenoiseFn, params, x_t, t, conds: Sequence[Any], weights):
  """out(c_0) + sum_i w_i (out(c_i) - out(c_{i-1})), from ONE batched call of denoise_fn.

  conds: n >= 1 condition pytrees with the batch axis of x_t; c_0 is the unconditional one.
  weights: n - 1 scalars (a sequence or a float [n-1] array; traced, so new weights do not
    recompile). 1 = no guidance; Imagen's eps_u + w (eps_c - eps_u) is conds=(u, c), [w].
  t: int32 [B] training timesteps.
  The combination is affine (its coefficients sum to 1) and eps, x0 and v are affine in one
  another at fixed x_t, so guiding the raw output is the same as guiding eps, for any prediction.
  """
  n = len(conds)
  if n == 1:
    return denoise_fn(params, x_t, t, conds[0])
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (n - 1,):
    raise ValueError(f"{n} conditions need {n - 1} weights, got shape {weights.shape}")
  cond = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *conds)
  out = denoise_fn(params, jnp.concatenate([x_t] * n), jnp.concatenate([t] * n), cond)
  outs = jnp.split(out, n, axis=0)
  guided = outs[0]
  for i in range(1, n):
    guided = guided + weights[i - 1] * (outs[i] - outs[i - 1])
  return guided


def threshold_x0(x0, mode: str = "dynamic", percentile: float = 0.995):
  """Keeps predicted x0 in [-1, 1] so large guidance weights do not saturate the image.

  'dynamic' (Imagen): s = max(1, quantile(|x0|, percentile)) per sample, clip to [-s, s], / s.
    `percentile` is a quantile in (0, 1] (0.995: Imagen's 99.5th percentile).
  'static': clip to [-1, 1]. 'none': unchanged.
  """
  if mode == "none":
    return x0
  if mode == "static":
    return jnp.clip(x0, -1.0, 1.0)
  if mode == "dynamic":
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=-1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s
  raise ValueError(f"threshold must be one of {THRESHOLDS}, got {mode!r}")


# -------------------------------------------------------------------------------- samplers

@functools.partial(jax.jit, static_argnames=("denoise_fn", "shape", "sampler", "prediction",
                                             "threshold", "return_x0"))
def _sample_loop(denoise_fn, params, schedule, conds, weights, rng, percentile, eta, *,
                 shape, sampler, prediction, threshold, return_x0):
  """One scan over the (respaced) schedule, from step S-1 down to 0."""
  init_rng, loop_rng = jax.random.split(rng)
  x_init = jax.random.normal(init_rng, shape, jnp.float32)
  batch = shape[0]

  def step(x, i):
    idx = jnp.full((batch,), i, jnp.int32)
    out = guided_prediction(denoise_fn, params, x, schedule.timesteps[idx], conds, weights)
    _, x0 = to_eps_x0(schedule, prediction, out, x, idx)
    x0 = threshold_x0(x0, threshold, percentile)
    z = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
    last = (i == 0)  # the final step returns the mean: no noise
    if sampler == "ddpm":
      # Ancestral step from q(x_{t-1} | x_t, x0) with its (fixed, small) posterior variance.
      mean = (_at(schedule.posterior_mean_coef1, idx, x) * x0
              + _at(schedule.posterior_mean_coef2, idx, x) * x)
      std = jnp.exp(0.5 * _at(schedule.posterior_log_variance_clipped, idx, x))
      x_prev = mean + jnp.where(last, 0.0, std) * z
    else:
      # DDIM (Song et al. 2021): eps re-derived from the thresholded x0 keeps them consistent.
      eps = eps_from_x0(schedule, x, idx, x0)
      a = _at(schedule.alphas_cumprod, idx, x)
      a_prev = _at(schedule.alphas_cumprod_prev, idx, x)
      sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
      x_prev = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
                + jnp.where(last, 0.0, sigma) * z)
    return x_prev, (x0 if return_x0 else None)

  x, x0s = jax.lax.scan(step, x_init, jnp.arange(schedule.num_steps - 1, -1, -1))
  x = jnp.clip(x, -1.0, 1.0)
  return (x, x0s) if return_x0 else x


def sample(denoise_fn: DenoiseFn, params, schedule: Schedule, conds: Sequence[Any], rng,
           shape: tuple[int, ...], *, weights=(), sampler: str = "ddpm",
           steps: int | None = None, prediction: str = "eps", threshold: str = "dynamic",
           percentile: float = 0.995, eta: float = 0.0, return_x0: bool = False):
  """Draws images [B, H, W, C] in [-1, 1] with guided DDPM (ancestral) or DDIM.

  denoise_fn: the model (see the module docstring). It is a static jit argument: pass the same
    function object each call (not a fresh lambda / partial) or every call recompiles.
  schedule: the training schedule; `steps` respaces it (None: all T steps).
  conds, weights: see `guided_prediction`; one condition means no guidance.
  threshold: 'dynamic' (percentile: `config.diffusion.dynamic_threshold_percentile`),
    'static' or 'none', applied to x0 at every step. eta: DDIM noise (0: deterministic).
  return_x0: also return the thresholded x0 of each step, [S, B, H, W, C], noisiest first.
  The loop is one jitted lax.scan; weights, percentile, eta, rng and params are traced, so
  changing them does not recompile. Deterministic for a given rng.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
  if threshold not in THRESHOLDS:
    raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
  weights = jnp.asarray(weights, jnp.float32).reshape(-1)
  if weights.shape[0] != len(conds) - 1:
    raise ValueError(f"{len(conds)} conditions need {len(conds) - 1} weights, "
                     f"got {weights.shape[0]}")
  return _sample_loop(denoise_fn, params, respace(schedule, steps), tuple(conds), weights, rng,
                      jnp.float32(percentile), jnp.float32(eta), shape=tuple(shape),
                      sampler=sampler, prediction=prediction, threshold=threshold,
                      return_x0=return_x0)


def ddpm_sample(denoise_fn, params, schedule, conds, rng, shape, **kwargs):
  """Ancestral sampling, the paper's sampler (experts: guidance 30). See `sample`."""
  return sample(denoise_fn, params, schedule, conds, rng, shape, sampler="ddpm", **kwargs)


def ddim_sample(denoise_fn, params, schedule, conds, rng, shape, **kwargs):
  """DDIM sampling (eta=0: deterministic given the initial noise). See `sample`."""
  return sample(denoise_fn, params, schedule, conds, rng, shape, sampler="ddim", **kwargs)
