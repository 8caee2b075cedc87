"""suti.diffusion: schedules, loss and samplers, checked against denoisers known in closed form.

For data that is one image x*, a mixture of two images, or a Gaussian, the ideal denoiser
E[x0 | x_t] is exact, so a correct sampler must reproduce the data distribution.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti import config_lib
from suti import diffusion

T = 1000
SHAPE = (4, 8, 8, 3)


@pytest.fixture(scope="module")
def sched():
  return diffusion.make_schedule("cosine", T)


def _x_star(seed=0, shape=SHAPE[1:]):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def _as_prediction(sched, prediction, x_t, t, x0):
  """The output a `prediction`-model gives when its x0 estimate is `x0` (independent math)."""
  a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
  eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]


def _point_denoiser(sched, x_star, prediction="eps"):
  """Ideal denoiser for a dataset that is the single image x*; cond unused."""
  def fn(params, x_t, t, cond):
    del params, cond
    return _as_prediction(sched, prediction, x_t, t, jnp.broadcast_to(x_star, x_t.shape))
  return fn


def _two_point_denoiser(sched, x1, x2, prediction="eps"):
  """E[x0 | x_t] for x0 = x1 or x2 with probability 1/2 each."""
  points = jnp.stack([x1, x2])  # [2, H, W, C]

  def fn(params, x_t, t, cond):
    del params, cond
    a = sched.alphas_cumprod[t].reshape(-1, 1)
    d2 = jnp.sum((x_t.reshape(x_t.shape[0], 1, -1)
                  - jnp.sqrt(a)[..., None] * points.reshape(1, 2, -1)) ** 2, -1)  # [B, 2]
    w = jax.nn.softmax(-d2 / (2 * (1 - a)), axis=-1)
    x0 = jnp.einsum("bk,k...->b...", w, points)
    return _as_prediction(sched, prediction, x_t, t, x0)
  return fn


def _gaussian_denoiser(sched, mu, sigma, prediction="eps"):
  """E[x0 | x_t] for x0 ~ N(mu, sigma^2) per pixel."""
  def fn(params, x_t, t, cond):
    del params, cond
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = mu + jnp.sqrt(a) * sigma**2 / (a * sigma**2 + 1 - a) * (x_t - jnp.sqrt(a) * mu)
    return _as_prediction(sched, prediction, x_t, t, x0)
  return fn


def _dummy_cond(batch=SHAPE[0]):
  return jnp.zeros((batch, 1))


# ------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_properties(kind):
  s = diffusion.make_schedule(kind, T)
  a = np.asarray(s.alphas_cumprod)
  assert a.shape == (T,) and s.num_steps == T
  assert np.all(np.diff(a) < 0) and np.all(a > 0) and np.all(a < 1)
  assert a[0] > 0.999 and a[-1] < 1e-4  # starts at the data, ends at (almost) pure noise
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(s.betas, np.float64)), a, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(T))
  assert np.all(np.asarray(s.posterior_variance)[1:] > 0)


def test_from_config():
  c = config_lib.base_config()
  c.diffusion.schedule, c.diffusion.timesteps = "linear", 100
  s = diffusion.from_config(c)
  assert s.num_steps == 100
  np.testing.assert_allclose(s.alphas_cumprod, diffusion.make_schedule("linear", 100)
                             .alphas_cumprod)
  with pytest.raises(ValueError, match="schedule"):
    diffusion.make_schedule("sigmoid", 10)


@pytest.mark.parametrize("steps", [50, 7, 1000])
def test_respacing_keeps_alphas_cumprod(sched, steps):
  r = diffusion.respace(sched, steps)
  ts = np.asarray(r.timesteps)
  assert r.num_steps == steps and ts[0] == 0 and ts[-1] == T - 1 and np.all(np.diff(ts) > 0)
  np.testing.assert_allclose(r.alphas_cumprod, np.asarray(sched.alphas_cumprod)[ts], rtol=1e-5)
  # The respaced betas form a valid chain reaching the same alpha_bar.
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(r.betas, np.float64)), r.alphas_cumprod,
                             rtol=1e-4)


# ----------------------------------------------------------------- forward process, targets

def test_q_sample_statistics(sched):
  t = jnp.full((4096,), 300)
  x0 = jnp.full((4096, 4, 4, 1), 0.5)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  a = float(sched.alphas_cumprod[300])
  np.testing.assert_allclose(jnp.mean(x_t), np.sqrt(a) * 0.5, atol=0.01)
  np.testing.assert_allclose(jnp.std(x_t), np.sqrt(1 - a), rtol=0.01)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_consistent(sched, prediction):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
  x0 = jax.random.uniform(k1, (16, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.randint(k3, (16,), 0, T - 20)  # away from t ~ T, where x0 <- eps is ill-posed
  x_t = diffusion.q_sample(sched, x0, t, eps)
  out = diffusion.prediction_target(sched, prediction, x0, eps, t)
  np.testing.assert_allclose(out, _as_prediction(sched, prediction, x_t, t, x0), atol=2e-3)
  eps2, x02 = diffusion.to_eps_x0(sched, prediction, out, x_t, t)
  np.testing.assert_allclose(eps2, eps, atol=2e-3)
  np.testing.assert_allclose(x02, x0, atol=2e-3)
  np.testing.assert_allclose(diffusion.eps_from_x0(sched, x_t, t, x0), eps, atol=2e-3)
  np.testing.assert_allclose(diffusion.x0_from_eps(sched, x_t, t, eps), x0, atol=2e-3)


# ------------------------------------------------------------------------------------ loss

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_oracle_is_zero(sched, prediction):
  x_star = _x_star()
  x0 = jnp.broadcast_to(x_star, (64,) + x_star.shape)
  oracle = _point_denoiser(sched, x_star, prediction)
  perturbed = lambda p, x, t, c: oracle(p, x, t, c) + 0.1
  rng = jax.random.PRNGKey(3)
  loss = diffusion.diffusion_loss(sched, oracle, None, x0, _dummy_cond(64), rng, prediction)
  worse = diffusion.diffusion_loss(sched, perturbed, None, x0, _dummy_cond(64), rng, prediction)
  assert float(loss) < 1e-6
  np.testing.assert_allclose(worse, 0.01, rtol=1e-2)
  per_example = diffusion.diffusion_loss(sched, oracle, None, x0, _dummy_cond(64), rng,
                                         prediction, reduce=False)
  assert per_example.shape == (64,)


def test_loss_grad_and_vmap_over_experts(sched):
  """A pack of experts (stacked params) trains with vmap(grad(loss))."""
  def denoise(params, x_t, t, cond):
    del t, cond
    return params["w"] * x_t

  x0 = jnp.zeros((3, 2) + SHAPE[1:])  # [experts, B, H, W, C]
  params = {"w": jnp.array([0.0, 0.5, 1.0])}
  rngs = jax.random.split(jax.random.PRNGKey(4), 3)
  loss_fn = lambda p, x, r: diffusion.diffusion_loss(sched, denoise, p, x, _dummy_cond(2), r)
  grads = jax.jit(jax.vmap(jax.grad(loss_fn)))(params, x0, rngs)
  assert grads["w"].shape == (3,) and np.all(np.isfinite(grads["w"]))
  # x0 = 0 means x_t = sqrt(1-a) eps: w = 1 is (nearly) best, so its gradient is the smallest.
  assert abs(grads["w"][2]) < abs(grads["w"][0])


# -------------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("sampler,prediction", [("ddpm", "eps"), ("ddim", "eps"),
                                                ("ddpm", "v"), ("ddim", "x0")])
def test_samplers_reproduce_single_point(sched, sampler, prediction):
  x_star = _x_star()
  fn = _point_denoiser(sched, x_star, prediction)
  x = diffusion.sample(fn, None, sched, [_dummy_cond()], jax.random.PRNGKey(5), SHAPE,
                       sampler=sampler, steps=50, prediction=prediction)
  assert x.shape == SHAPE
  np.testing.assert_allclose(x, jnp.broadcast_to(x_star, SHAPE), atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_land_on_one_of_two_points(sched, sampler):
  x1, x2 = _x_star(1), _x_star(2)
  fn = _two_point_denoiser(sched, x1, x2)
  x = diffusion.sample(fn, None, sched, [_dummy_cond(16)], jax.random.PRNGKey(6),
                       (16,) + SHAPE[1:], sampler=sampler, steps=50, threshold="none")
  d1 = jnp.max(jnp.abs(x - x1), axis=(1, 2, 3))
  d2 = jnp.max(jnp.abs(x - x2), axis=(1, 2, 3))
  assert np.all(np.minimum(d1, d2) < 1e-2), np.minimum(d1, d2)
  assert 0 < int(jnp.sum(d1 < d2)) < 16  # both modes appear (fails with prob. ~2^-15)


def test_ddpm_matches_gaussian_data_statistics(sched):
  fn = _gaussian_denoiser(sched, 0.3, 0.2)
  x = diffusion.sample(fn, None, sched, [_dummy_cond(64)], jax.random.PRNGKey(7),
                       (64,) + SHAPE[1:], sampler="ddpm", steps=100, threshold="none")
  np.testing.assert_allclose(jnp.mean(x), 0.3, atol=0.01)
  np.testing.assert_allclose(jnp.std(x), 0.2, rtol=0.05)


def test_ddim_eta1_equals_ddpm(sched):
  """DDIM with eta=1 has the DDPM posterior variance; with the same noise they coincide."""
  fn = _gaussian_denoiser(sched, 0.0, 0.5)
  kw = dict(steps=20, threshold="none")
  rng = jax.random.PRNGKey(8)
  a = diffusion.sample(fn, None, sched, [_dummy_cond()], rng, SHAPE, sampler="ddpm", **kw)
  b = diffusion.sample(fn, None, sched, [_dummy_cond()], rng, SHAPE, sampler="ddim", eta=1.0,
                       **kw)
  np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_determinism(sched, sampler):
  fn = _gaussian_denoiser(sched, 0.0, 0.5)
  draw = lambda seed: diffusion.sample(fn, None, sched, [_dummy_cond()],
                                       jax.random.PRNGKey(seed), SHAPE, sampler=sampler,
                                       steps=10)
  np.testing.assert_array_equal(draw(0), draw(0))
  assert float(jnp.max(jnp.abs(draw(0) - draw(1)))) > 0.1


def test_sampler_compiles_once(sched):
  traces = []

  def fn(params, x_t, t, cond):
    traces.append(x_t.shape)  # runs only while tracing
    return params * x_t + cond

  conds = [jnp.zeros(SHAPE), jnp.ones(SHAPE)]
  kw = dict(weights=[3.0], sampler="ddim", steps=10)
  diffusion.sample(fn, 0.5, sched, conds, jax.random.PRNGKey(0), SHAPE, **kw)
  n = len(traces)
  assert n >= 1
  kw["weights"] = [7.0]  # new weights, params, key, percentile: same compiled loop
  diffusion.sample(fn, 0.2, sched, conds, jax.random.PRNGKey(1), SHAPE, percentile=0.9, **kw)
  assert len(traces) == n
  assert all(s[0] == 2 * SHAPE[0] for s in traces)  # both conditions in one batched call


# ------------------------------------------------------------------ guidance, thresholding

def test_guided_prediction_three_conditions():
  calls = []

  def fn(params, x_t, t, cond):
    calls.append(x_t.shape[0])
    return params * x_t * cond["a"][:, None, None, None] + cond["b"] + t[:, None, None, None]

  k = jax.random.split(jax.random.PRNGKey(9), 4)
  x_t = jax.random.normal(k[0], SHAPE)
  t = jnp.arange(SHAPE[0], dtype=jnp.int32)
  conds = [{"a": jax.random.normal(k[i + 1], SHAPE[:1]),
            "b": jnp.full(SHAPE, float(i))} for i in range(3)]
  outs = [fn(2.0, x_t, t, c) for c in conds]
  calls.clear()
  w1, w2 = 7.0, 3.0
  got = diffusion.guided_prediction(fn, 2.0, x_t, t, conds, [w1, w2])
  want = outs[0] + w1 * (outs[1] - outs[0]) + w2 * (outs[2] - outs[1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert calls == [3 * SHAPE[0]]  # one batched call over all conditions
  # Weight 1 everywhere: no guidance, the last condition alone.
  np.testing.assert_allclose(diffusion.guided_prediction(fn, 2.0, x_t, t, conds, [1.0, 1.0]),
                             outs[2], rtol=1e-5, atol=1e-5)
  # Two conditions: Imagen's eps_u + w (eps_c - eps_u).
  np.testing.assert_allclose(diffusion.guided_prediction(fn, 2.0, x_t, t, conds[:2], [30.0]),
                             outs[0] + 30.0 * (outs[1] - outs[0]), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="weights"):
    diffusion.guided_prediction(fn, 2.0, x_t, t, conds, [1.0])


def test_dynamic_threshold_function():
  x0 = jnp.stack([jnp.linspace(-0.5, 0.5, 1000), jnp.linspace(-40, 40, 1000)])
  y = diffusion.threshold_x0(x0, "dynamic", 0.995)
  np.testing.assert_allclose(y[0], x0[0], atol=1e-6)  # in range: untouched (s = 1)
  assert float(jnp.max(jnp.abs(y[1]))) <= 1.0
  assert float(jnp.mean(jnp.abs(y[1]) >= 0.999)) < 0.02  # divided, not merely clipped
  np.testing.assert_allclose(diffusion.threshold_x0(x0, "static"), jnp.clip(x0, -1, 1))
  np.testing.assert_array_equal(diffusion.threshold_x0(x0, "none"), x0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_30_dynamic_threshold_prevents_saturation(sched, sampler):
  """cond -> oracle of x*, uncond -> oracle of -x*: guided x0 = 59 x*, far out of range."""
  x_star = _x_star(3)

  def fn(params, x_t, t, cond):
    del params
    target = cond[:, None, None, None] * x_star  # cond = +1 (text) or -1 (unconditional)
    return _as_prediction(sched, "eps", x_t, t, target)

  batch = SHAPE[0]
  conds = [-jnp.ones(batch), jnp.ones(batch)]
  saturated = lambda x: float(jnp.mean(jnp.abs(x) >= 0.999))
  run = lambda mode: diffusion.sample(fn, None, sched, conds, jax.random.PRNGKey(10), SHAPE,
                                      weights=[30.0], sampler=sampler, steps=50,
                                      threshold=mode, return_x0=True)
  x, x0s = run("dynamic")
  assert x0s.shape == (50,) + SHAPE
  assert float(jnp.max(jnp.abs(x0s))) <= 1.0 + 1e-5
  assert saturated(x) < 0.05
  # Dynamic thresholding rescales: the image keeps the direction of x*.
  corr = jnp.corrcoef(x.reshape(-1), jnp.broadcast_to(x_star, SHAPE).reshape(-1))[0, 1]
  assert float(corr) > 0.99

  x, x0s = run("none")
  assert float(jnp.max(jnp.abs(x0s))) > 10.0
  assert saturated(x) > 0.5
  x, _ = run("static")
  assert saturated(x) > 0.5  # clipping alone keeps x0 in range but still saturates


def test_sample_argument_errors(sched):
  fn = _point_denoiser(sched, _x_star())
  args = (fn, None, sched, [_dummy_cond()], jax.random.PRNGKey(0), SHAPE)
  with pytest.raises(ValueError, match="sampler"):
    diffusion.sample(*args, sampler="euler")
  with pytest.raises(ValueError, match="threshold"):
    diffusion.sample(*args, threshold="soft")
  with pytest.raises(ValueError, match="weights"):
    diffusion.sample(*args, weights=[2.0])
