"""suti.diffusion: schedules, loss and samplers, checked against denoisers known in closed form.

For data that is one image x*, a mixture of two images, or a Gaussian, the ideal denoiser
E[x0 | x_t] is exact, so a correct sampler must reproduce the data (up to discretization).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti import config_lib
from suti import diffusion

T = 1000
SHAPE = (16, 8, 8, 3)


@pytest.fixture(scope="module")
def sched():
  return diffusion.make_schedule("cosine", T)


def _x_star(seed=0, shape=SHAPE[1:]):
  # Test data from numpy: eager jax.random would compile a threefry kernel per shape.
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _as_prediction(alphas_cumprod, prediction, x_t, t, x0):
  """The output a `prediction`-model gives when its x0 estimate is `x0` (independent math)."""
  a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
  eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]


def _mixture_denoiser(prediction):
  """The ideal denoiser E[x0 | x_t] when x0 ~ cond_b * (N(p_1, sigma^2 I) + N(p_2, sigma^2 I)) / 2.

  sigma = 0, p_1 = p_2: the dataset is one image x*; p_1 != p_2: two images; sigma > 0: a
  Gaussian. cond [B] scales the data per example (+1: x*, -1: -x*), so conditions matter.
  The data live in params, which jit traces: every test shares one compiled sampler per
  (sampler, prediction, threshold, steps), which keeps this file fast.
  """
  def fn(params, x_t, t, cond):
    b = x_t.shape[0]
    a = params["alphas_cumprod"][t].reshape(b, 1, 1)
    c = cond.reshape(b, 1, 1)
    means = c * params["points"].reshape(1, 2, -1)        # [B, 2, D]
    s2 = (c * params["sigma"]) ** 2
    var = a * s2 + 1 - a                                  # Var(x_t | component), per pixel
    resid = x_t.reshape(b, 1, -1) - jnp.sqrt(a) * means
    # p(first | x_t) as a sigmoid of one summed difference: softmax over two ~1e9 logits
    # would turn NaN when XLA recomputes them with different rounding.
    logit = jnp.sum(resid[:, 1] ** 2 - resid[:, 0] ** 2, -1) / (2 * var[:, 0, 0])
    w = jax.nn.sigmoid(logit).reshape(b, 1, 1)
    x0_k = means + jnp.sqrt(a) * s2 / var * resid         # E[x0 | x_t, component]
    x0 = (w * x0_k[:, :1] + (1 - w) * x0_k[:, 1:]).reshape(x_t.shape)
    return _as_prediction(params["alphas_cumprod"], prediction, x_t, t, x0)
  return fn


DENOISERS = {p: _mixture_denoiser(p) for p in diffusion.PREDICTIONS}


def _data(sched, x1, x2=None, sigma=0.0):
  """Params of DENOISERS: always K = 2 (x2 = x1 for one image), so shapes, and thus the
  compiled samplers, are shared across tests."""
  x2 = x1 if x2 is None else x2
  return {"alphas_cumprod": sched.alphas_cumprod, "points": jnp.stack([x1, x2]),
          "sigma": jnp.float32(sigma)}


def _ones(batch=SHAPE[0]):
  return jnp.ones((batch,))


# ------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_properties(kind):
  s = diffusion.make_schedule(kind, T)
  a = np.asarray(s.alphas_cumprod)
  assert a.shape == (T,) and s.num_steps == T
  assert np.all(np.diff(a) < 0) and np.all(a > 0) and np.all(a < 1)
  assert a[0] > 0.999 and a[-1] < 1e-4  # starts at the data, ends at (almost) pure noise
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(s.betas, np.float64)), a, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(T))
  assert np.all(np.asarray(s.posterior_variance)[1:] > 0)


def test_from_config():
  c = config_lib.base_config()
  c.diffusion.schedule, c.diffusion.timesteps = "linear", 100
  s = diffusion.from_config(c)
  assert s.num_steps == 100
  np.testing.assert_allclose(s.alphas_cumprod,
                             diffusion.make_schedule("linear", 100).alphas_cumprod)
  with pytest.raises(ValueError, match="schedule"):
    diffusion.make_schedule("sigmoid", 10)


@pytest.mark.parametrize("steps", [50, 7, 1000])
def test_respacing_keeps_alphas_cumprod(sched, steps):
  r = diffusion.respace(sched, steps)
  ts = np.asarray(r.timesteps)
  assert r.num_steps == steps and ts[0] == 0 and ts[-1] == T - 1 and np.all(np.diff(ts) > 0)
  np.testing.assert_allclose(r.alphas_cumprod, np.asarray(sched.alphas_cumprod)[ts], rtol=1e-6)
  # The respaced betas form a valid chain reaching the same alpha_bar.
  a = np.asarray(r.alphas_cumprod, np.float64)
  np.testing.assert_allclose(r.betas, 1 - a / np.append(1.0, a[:-1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r.alphas_cumprod_prev[1:], r.alphas_cumprod[:-1])


def test_respacing_to_one_step_starts_from_noise(sched):
  r = diffusion.respace(sched, 1)
  assert list(np.asarray(r.timesteps)) == [T - 1]
  assert np.all(np.isfinite(np.asarray(r.posterior_log_variance_clipped)))


# ----------------------------------------------------------------- forward process, targets

def test_q_sample_statistics(sched):
  t = jnp.full((4096,), 300)
  x0 = jnp.full((4096, 4, 4, 1), 0.5)
  noise = jnp.asarray(np.random.default_rng(1).normal(size=x0.shape), jnp.float32)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  a = float(sched.alphas_cumprod[300])
  np.testing.assert_allclose(jnp.mean(x_t), np.sqrt(a) * 0.5, atol=0.01)
  np.testing.assert_allclose(jnp.std(x_t), np.sqrt(1 - a), rtol=0.01)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_consistent(sched, prediction):
  g = np.random.default_rng(2)
  x0 = jnp.asarray(g.uniform(-1, 1, (16, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(g.normal(size=x0.shape), jnp.float32)
  t = jnp.asarray(g.integers(0, T - 20, 16))  # away from t ~ T, where x0 <- eps is ill-posed
  x_t = diffusion.q_sample(sched, x0, t, eps)
  out = diffusion.prediction_target(sched, prediction, x0, eps, t)
  np.testing.assert_allclose(out, _as_prediction(sched.alphas_cumprod, prediction, x_t, t, x0),
                             atol=2e-3)
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
  oracle = DENOISERS[prediction]
  perturbed = lambda p, x, t, c: oracle(p, x, t, c) + 0.1
  params, rng = _data(sched, x_star), jax.random.PRNGKey(3)
  loss = diffusion.diffusion_loss(sched, oracle, params, x0, _ones(64), rng, prediction)
  worse = diffusion.diffusion_loss(sched, perturbed, params, x0, _ones(64), rng, prediction)
  assert float(loss) < 1e-6
  np.testing.assert_allclose(worse, 0.01, rtol=1e-2)
  per_example = diffusion.diffusion_loss(sched, oracle, params, x0, _ones(64), rng, prediction,
                                         reduce=False)
  assert per_example.shape == (64,)


def test_loss_high_noise_fraction_and_weight_cap(sched):
  """The apprentice's options: a share of the batch at high noise; min(1/alpha_bar, cap)."""
  x_star = _x_star()
  x0 = jnp.broadcast_to(x_star, (64,) + x_star.shape)
  perturbed = lambda p, x, t, c: DENOISERS["eps"](p, x, t, c) + 0.1  # loss 0.01 at every t
  params, rng = _data(sched, x_star), jax.random.PRNGKey(5)
  loss = lambda **kw: np.asarray(diffusion.diffusion_loss(
      sched, perturbed, params, x0, _ones(64), rng, "eps", reduce=False, **kw)) / 0.01
  np.testing.assert_allclose(loss(), 1.0, rtol=1e-3)  # the defaults: w_t = 1
  weights = loss(high_noise_fraction=0.5, high_noise_from=0.9, weight_cap=1e9)
  floor = 1.0 / float(sched.alphas_cumprod[int(0.9 * sched.num_steps)])
  assert np.all(weights[:32] >= 0.99 * floor)  # t in [0.9 T, T)
  assert np.sum(weights[32:] < 0.99 * floor) > 16  # t in [0, T) as before
  capped = loss(high_noise_fraction=0.5, high_noise_from=0.9, weight_cap=4.0)
  assert np.all(capped[:32] > 3.99) and np.all((capped >= 0.999) & (capped <= 4.001))
  # The rest of the batch draws the plain loss's t: earlier results stay reproducible.
  np.testing.assert_allclose(weights[32:], loss(weight_cap=1e9)[32:], rtol=1e-5)


def test_loss_grad_and_vmap_over_experts(sched):
  """A pack of experts (stacked params) trains with vmap(grad(loss))."""
  def denoise(params, x_t, t, cond):
    del t, cond
    return params["w"] * x_t

  x0 = jnp.zeros((3, 2) + SHAPE[1:])  # [experts, B, H, W, C]
  params = {"w": jnp.array([0.0, 0.5, 1.0])}
  rngs = jax.random.split(jax.random.PRNGKey(4), 3)
  loss_fn = lambda p, x, r: diffusion.diffusion_loss(sched, denoise, p, x, _ones(2), r)
  grads = jax.jit(jax.vmap(jax.grad(loss_fn)))(params, x0, rngs)
  assert grads["w"].shape == (3,) and np.all(np.isfinite(grads["w"]))
  # x0 = 0 means x_t = sqrt(1-a) eps: w = 1 is (nearly) best, so its gradient is the smallest.
  assert abs(grads["w"][2]) < abs(grads["w"][0])


# -------------------------------------------------------------------------------- samplers

def _sample(sched, params, rng, **kw):
  kw.setdefault("prediction", "eps")
  return diffusion.sample(DENOISERS[kw["prediction"]], params, sched, [_ones()], rng, SHAPE,
                          **kw)


@pytest.mark.parametrize("sampler,prediction", [("ddpm", "eps"), ("ddim", "v")])
def test_samplers_reproduce_single_point(sched, sampler, prediction):
  x_star = _x_star()
  x = _sample(sched, _data(sched, x_star), jax.random.PRNGKey(5), sampler=sampler, steps=50,
              prediction=prediction)  # default: dynamic thresholding, a no-op for |x*| <= 1
  assert x.shape == SHAPE
  np.testing.assert_allclose(x, jnp.broadcast_to(x_star, SHAPE), atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_land_on_one_of_two_points(sched, sampler):
  x1, x2 = _x_star(1), _x_star(2)
  x = _sample(sched, _data(sched, x1, x2), jax.random.PRNGKey(6), sampler=sampler, steps=100,
              threshold="none")
  d1 = jnp.max(jnp.abs(x - x1), axis=(1, 2, 3))
  d2 = jnp.max(jnp.abs(x - x2), axis=(1, 2, 3))
  assert np.all(np.minimum(d1, d2) < 1e-2), np.minimum(d1, d2)
  assert 0 < int(jnp.sum(d1 < d2)) < SHAPE[0]  # both modes appear


def _gaussian_chain_law(r, mu, sigma, sampler):
  """Exact mean and std of the discretized chain for Gaussian data: each step is affine in x."""
  r = jax.tree.map(lambda x: np.asarray(x, np.float64), r)
  m, v = 0.0, 1.0
  for i in range(len(r.betas) - 1, -1, -1):
    a, a_prev = r.alphas_cumprod[i], r.alphas_cumprod_prev[i]
    k = np.sqrt(a) * sigma**2 / (a * sigma**2 + 1 - a)  # x0_hat = k x + (1 - k sqrt(a)) mu
    x0_gain, x0_bias = k, (1 - k * np.sqrt(a)) * mu
    if sampler == "ddpm":
      c1, c2 = r.posterior_mean_coef1[i], r.posterior_mean_coef2[i]
      gain, bias = c1 * x0_gain + c2, c1 * x0_bias
      noise = r.posterior_variance[i] if i > 0 else 0.0
    else:  # eta = 0
      e = np.sqrt((1 - a_prev) / (1 - a))
      gain = np.sqrt(a_prev) * x0_gain + e * (1 - np.sqrt(a) * x0_gain)
      bias = np.sqrt(a_prev) * x0_bias - e * np.sqrt(a) * x0_bias
      noise = 0.0
    m, v = gain * m + bias, gain**2 * v + noise
  return m, np.sqrt(v)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_match_gaussian_data_law(sched, sampler):
  mu, sigma = 0.3, 0.2
  x = _sample(sched, _data(sched, jnp.full(SHAPE[1:], mu), sigma=sigma), jax.random.PRNGKey(7),
              sampler=sampler, steps=100, threshold="none")
  m, s = _gaussian_chain_law(diffusion.respace(sched, 100), mu, sigma, sampler)
  np.testing.assert_allclose(jnp.mean(x), m, atol=0.01)
  np.testing.assert_allclose(jnp.std(x), s, rtol=0.03)
  # ... and that law is the data's, up to the discretization of 100 steps.
  np.testing.assert_allclose([m, s], [mu, sigma], rtol=0.1)


def test_ddim_eta1_equals_ddpm(sched):
  """DDIM with eta=1 has the DDPM posterior variance; with the same noise they coincide."""
  params, rng = _data(sched, jnp.zeros(SHAPE[1:]), sigma=0.5), jax.random.PRNGKey(8)
  a = _sample(sched, params, rng, sampler="ddpm", steps=100, threshold="none")
  b = _sample(sched, params, rng, sampler="ddim", eta=1.0, steps=100, threshold="none")
  np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_determinism(sched, sampler):
  params = _data(sched, jnp.zeros(SHAPE[1:]), sigma=0.5)
  draw = lambda seed: _sample(sched, params, jax.random.PRNGKey(seed), sampler=sampler,
                              steps=100, threshold="none")
  np.testing.assert_array_equal(draw(0), draw(0))
  assert float(jnp.max(jnp.abs(draw(0) - draw(1)))) > 0.1


def test_sampler_compiles_once(sched):
  traces = []

  def fn(params, x_t, t, cond):
    traces.append(x_t.shape)  # runs only while tracing
    return params * x_t + cond

  conds = [jnp.zeros(SHAPE), jnp.ones(SHAPE)]
  kw = dict(sampler="ddim", steps=10)
  diffusion.sample(fn, 0.5, sched, conds, jax.random.PRNGKey(0), SHAPE, weights=[3.0], **kw)
  n = len(traces)
  assert n >= 1
  # New weights, params, key, percentile and eta: the same compiled loop.
  diffusion.sample(fn, 0.2, sched, conds, jax.random.PRNGKey(1), SHAPE, weights=[7.0],
                   percentile=0.9, eta=0.5, **kw)
  assert len(traces) == n
  assert all(s[0] == 2 * SHAPE[0] for s in traces)  # both conditions in one batched call


def test_sample_vmaps_over_experts(sched):
  """The experts stage draws from a pack of experts at once: vmap over params and keys."""
  def fn(params, x_t, t, cond):
    del t, cond
    return params * x_t

  draw = lambda p, k: diffusion.sample(fn, p, sched, [_ones()], k, SHAPE, sampler="ddim",
                                       steps=10, threshold="static")
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  xs = jax.vmap(draw)(jnp.array([0.0, 0.5, 1.0]), keys)
  assert xs.shape == (3,) + SHAPE
  np.testing.assert_allclose(xs[1], draw(0.5, keys[1]), atol=1e-5)


# ------------------------------------------------------------------ guidance, thresholding

def test_guided_prediction_three_conditions():
  calls = []

  def fn(params, x_t, t, cond):
    calls.append(x_t.shape[0])
    return params * x_t * cond["a"][:, None, None, None] + cond["b"] + t[:, None, None, None]

  g = np.random.default_rng(9)
  x_t = jnp.asarray(g.normal(size=SHAPE), jnp.float32)
  t = jnp.arange(SHAPE[0], dtype=jnp.int32)
  conds = [{"a": jnp.asarray(g.normal(size=SHAPE[:1]), jnp.float32),
            "b": jnp.full(SHAPE, float(i))} for i in range(3)]
  outs = [fn(2.0, x_t, t, c) for c in conds]
  calls.clear()
  w1, w2 = 7.0, 3.0
  got = diffusion.guided_prediction(fn, 2.0, x_t, t, conds, [w1, w2])
  want = outs[0] + w1 * (outs[1] - outs[0]) + w2 * (outs[2] - outs[1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
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
  """cond -> ideal denoiser of x*, uncond -> of -x*: guided x0 = -x* + 30 (2 x*) = 59 x*."""
  x_star = _x_star(3)
  conds = [-_ones(), _ones()]
  saturated = lambda x: float(jnp.mean(jnp.abs(x) >= 0.999))
  run = lambda mode: diffusion.sample(DENOISERS["eps"], _data(sched, x_star), sched, conds,
                                      jax.random.PRNGKey(10), SHAPE, weights=[30.0],
                                      sampler=sampler, steps=50, threshold=mode, return_x0=True)
  x, x0s = run("dynamic")
  assert x0s.shape == (50,) + SHAPE
  assert float(jnp.max(jnp.abs(x0s))) <= 1.0 + 1e-5
  assert saturated(x) < 0.05
  # Dynamic thresholding rescales rather than clips: the image keeps the pattern of x*.
  corr = jnp.corrcoef(x.reshape(-1), jnp.broadcast_to(x_star, SHAPE).reshape(-1))[0, 1]
  assert float(corr) > 0.99

  x, x0s = run("none")
  assert float(jnp.max(jnp.abs(x0s))) > 10.0
  assert saturated(x) > 0.5
  if sampler == "ddpm":
    x, _ = run("static")
    assert saturated(x) > 0.5  # clipping alone keeps x0 in range but saturates the image


def test_sample_argument_errors(sched):
  args = (DENOISERS["eps"], _data(sched, _x_star()), sched, [_ones()], jax.random.PRNGKey(0),
          SHAPE)
  with pytest.raises(ValueError, match="sampler"):
    diffusion.sample(*args, sampler="euler")
  with pytest.raises(ValueError, match="threshold"):
    diffusion.sample(*args, threshold="soft")
  with pytest.raises(ValueError, match="weights"):
    diffusion.sample(*args, weights=[2.0])
