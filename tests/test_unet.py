"""The Imagen-style UNet: shapes, the Down/Mid/Up seam, conditioning, size, vmap over experts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti.nn import unet as unet_lib
from tests import conftest
from tests.conftest import TWO_LEVEL


def load_config(name, arg=None):
  config = conftest.load_config(name, arg)
  if name == "tiny":  # the network's tests: two levels, self-attention and demo attention at both
    config.model.update(TWO_LEVEL)
  return config


def randomize(params, seed=1, scale=0.2):
  """Fresh params are zero on every residual branch (and the output conv), so the output is 0
  whatever the input; perturb every leaf so the conditioning paths are actually exercised."""
  rng = np.random.default_rng(seed)  # numpy: jax.random would compile once per leaf shape
  return jax.tree_util.tree_map(
      lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), params)


def inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  te = config.model.text_encoder
  x = rng.standard_normal((batch, config.image_size, config.image_size, 3)).astype(np.float32)
  t = rng.integers(0, config.diffusion.timesteps, (batch,)).astype(np.int32)
  tokens = rng.standard_normal((batch, te.max_length, te.width)).astype(np.float32)
  mask = np.arange(te.max_length)[None] < np.array([5, 3][:batch])[:, None]
  return x, t, tokens, mask


@pytest.fixture(scope="module")
def tiny():
  config = load_config("tiny")
  model = unet_lib.from_config(config)
  params = randomize(unet_lib.init_params(model, jax.random.PRNGKey(0), config))
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return config, model, params, apply


@pytest.mark.parametrize("image_size", [16, 32])
def test_shapes(image_size):
  config = load_config("tiny")
  config.image_size = image_size
  model = unet_lib.from_config(config)
  x, t, tokens, mask = inputs(config)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, tokens, mask)
  out = jax.jit(model.apply)(variables, x, t, tokens, mask)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Zero-initialised output conv: a fresh model predicts exactly 0.
  np.testing.assert_array_equal(out, 0.0)


def test_params_are_plain_nested_dicts(tiny):
  _, _, params, _ = tiny

  def check(tree, path=()):
    assert type(tree) is dict, path
    for key, value in tree.items():
      if isinstance(value, dict):
        check(value, path + (key,))
      else:
        assert value.dtype == jnp.float32, path + (key,)

  check(params)
  assert set(params) == {"cond", "down", "mid", "up"}


def test_stacks_compose_to_the_unet(tiny):
  config, model, params, apply = tiny
  x, t, tokens, mask = inputs(config)
  cond, down, mid, up = model.parts()

  @jax.jit  # one program instead of op-by-op dispatch (every op compiles once on CPU)
  def by_hand(params, x, t, tokens, mask):
    emb, context = cond.apply({"params": params["cond"]}, t, tokens, mask)
    h, skips = down.apply({"params": params["down"]}, x, emb, context, mask)
    h = mid.apply({"params": params["mid"]}, h, emb, context, mask)
    return up.apply({"params": params["up"]}, h, skips, emb, context, mask), skips

  out, skips = by_hand(params, x, t, tokens, mask)
  np.testing.assert_allclose(out, apply(params, x, t, tokens, mask), rtol=1e-5, atol=1e-5)
  # The skips are every feature map of the DownStack, largest first.
  assert [s.shape[1] for s in skips] == [16, 16, 8, 8]


def test_text_conditions_the_output_and_padding_does_not(tiny):
  config, _, params, apply = tiny
  x, t, tokens, mask = inputs(config)
  out = apply(params, x, t, tokens, mask)
  other = tokens.copy()
  other[:, 0] += np.random.default_rng(1).standard_normal(other.shape[-1])  # a kept token
  assert np.abs(apply(params, x, t, other, mask) - out).max() > 1e-3
  padding = tokens.copy()
  padding[~mask] = 100.0  # tokens the mask drops
  np.testing.assert_allclose(apply(params, x, t, padding, mask), out, rtol=1e-5, atol=1e-5)
  # An all-False mask (the unconditional input) ignores the tokens entirely.
  none = np.zeros_like(mask)
  np.testing.assert_allclose(apply(params, x, t, tokens, none), apply(params, x, t, other, none),
                             rtol=1e-5, atol=1e-5)
  assert np.isfinite(apply(params, x, t, tokens, none)).all()


def test_timestep_conditions_the_output(tiny):
  config, _, params, apply = tiny
  x, t, tokens, mask = inputs(config)
  assert np.abs(apply(params, x, t, tokens, mask) - apply(params, x, t + 1, tokens, mask)).max() > 0


def test_demo_attention_adds_params_and_starts_as_a_no_op(tiny):
  config, _, params, apply = tiny
  x, t, tokens, mask = inputs(config)
  res = config.model.cross_attention_resolutions[0]
  model = unet_lib.from_config(config, demo_attention_resolutions=(res,))
  demos = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 32)), jnp.float32)
  extra = {res: (demos, jnp.ones((2, 7), bool))}
  with_demo = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, tokens, mask, extra)["params"]
  apply_demo = jax.jit(lambda p, extra: model.apply({"params": p}, x, t, tokens, mask, extra))
  flat, base_flat = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (with_demo, params))
  new = set(flat) - set(base_flat)
  assert set(base_flat) <= set(flat)  # no existing param renamed
  assert new and all("demo_attentions" in jax.tree_util.keystr(k) for k in new)
  assert any("up_blocks" in jax.tree_util.keystr(k) for k in new)
  assert any("down_blocks" in jax.tree_util.keystr(k) for k in new)
  # Base params + freshly initialised demo layers: the output is exactly the base model's.
  merged = jax.tree_util.tree_map_with_path(
      lambda k, v: base_flat.get(k, v), with_demo)
  out = apply_demo(merged, extra)
  np.testing.assert_allclose(out, apply(params, x, t, tokens, mask), rtol=1e-5, atol=1e-5)
  # Trained (perturbed) demo layers do read the demos.
  trained = randomize(merged, seed=5)
  changed = apply_demo(trained, {res: (demos + 1.0, extra[res][1])})
  assert np.abs(changed - apply_demo(trained, extra)).max() > 1e-3


def test_demo_context_from_the_down_stack(tiny):
  # The apprentice's wiring: encode B*K demos with the shared DownStack, attend to them.
  config, model, params, _ = tiny
  x, t, tokens, mask = inputs(config)
  cond, down, _, _ = model.parts()
  demos = np.random.default_rng(4).standard_normal((4,) + x.shape[1:]).astype(np.float32)
  emb, context = cond.apply({"params": params["cond"]}, np.zeros(4, np.int32),
                            np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0))
  _, skips = jax.jit(down.apply)({"params": params["down"]}, demos, emb, context,
                                 np.repeat(mask, 2, 0))
  keep = np.array([[True, False], [True, True]])
  extra = unet_lib.demo_context(skips, (16, 8), num_demos=2, mask=keep)
  feats, feats_mask = extra[8]
  assert feats.shape == (2, 2 * 8 * 8, 32) and feats_mask.shape == (2, 128)
  np.testing.assert_array_equal(feats[1, 64:], skips[-1][3].reshape(64, 32))
  np.testing.assert_array_equal(feats_mask.sum(1), [64, 128])
  demo_model = unet_lib.from_config(config, demo_attention_resolutions=(16, 8))
  variables = jax.jit(demo_model.init)(jax.random.PRNGKey(0), x, t, tokens, mask, extra)
  out = jax.jit(demo_model.apply)(variables, x, t, tokens, mask, extra)
  assert out.shape == x.shape and np.isfinite(out).all()


def test_demo_attention_has_its_own_head_count(tiny):
  config, _, _, _ = tiny
  x, t, tokens, mask = inputs(config)
  res = config.model.cross_attention_resolutions[0]
  demos = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 32)), jnp.float32)
  extra = {res: (demos, jnp.ones((2, 7), bool))}

  def build(**kw):
    model = unet_lib.from_config(config, demo_attention_resolutions=(res,), **kw)
    params = randomize(jax.jit(model.init)(jax.random.PRNGKey(0), x, t, tokens, mask,
                                           extra)["params"], seed=5)
    return params, jax.jit(lambda p: model.apply({"params": p}, x, t, tokens, mask, extra))

  one_head, apply_one = build(demo_num_heads=1)
  default, apply_default = build()
  heads = config.model.num_heads
  flat = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(one_head)}
  demo_q = [s for k, s in flat.items() if "demo_attentions" in k and "['q']['kernel']" in k]
  text_q = [s for k, s in flat.items() if "cross_attentions" in k and "['q']['kernel']" in k]
  assert demo_q and all(s == (32, 1, 32) for s in demo_q)  # one head of the full width
  assert text_q and all(s == (32, heads, 32 // heads) for s in text_q)  # the base's own heads
  # The same weights regrouped into one head give a different function: the heads are real.
  regrouped = jax.tree_util.tree_map(
      lambda a, b: a.reshape(b.shape), one_head, default)
  assert np.abs(apply_default(regrouped) - apply_one(one_head)).max() > 1e-4
  # demo_num_heads equal to num_heads is the default network.
  same, apply_same = build(demo_num_heads=heads)
  np.testing.assert_allclose(apply_same(same), apply_default(default), rtol=1e-5, atol=1e-5)


def test_position_embedding_tells_cells_apart():
  emb = unet_lib.position_embedding(16, 32)
  assert emb.shape == (256, 32)
  # Every cell's own embedding is its nearest: a query can find "the same place" in a demo.
  similarity = emb @ emb.T
  np.testing.assert_array_equal(similarity.argmax(1), np.arange(256))
  # Row-major: cell (i, j) is row i * 16 + j; moving one cell right keeps the y channels.
  quarter = 32 // 4
  np.testing.assert_allclose(emb[5 * 16 + 3, 2 * quarter:], emb[5 * 16 + 4, 2 * quarter:])
  assert np.abs(emb[5 * 16 + 3, :2 * quarter] - emb[5 * 16 + 4, :2 * quarter]).max() > 0.1
  with pytest.raises(ValueError, match="dim >= 4"):
    unet_lib.position_embedding(4, 3)


def test_demo_positions_make_the_demo_attention_see_where_a_demo_cell_is(tiny):
  # Without positions attention is blind to the order of its context tokens: the demo's feature
  # cells moved around read the same. With them, the same content elsewhere reads differently.
  config, model, params, _ = tiny
  x, t, tokens, mask = inputs(config)
  cond, down, _, _ = model.parts()
  demo = np.random.default_rng(4).standard_normal((2,) + x.shape[1:]).astype(np.float32)
  emb, context = cond.apply({"params": params["cond"]}, np.zeros(2, np.int32), tokens, mask)
  _, skips = jax.jit(down.apply)({"params": params["down"]}, demo, emb, context, mask)
  order = np.random.default_rng(7).permutation(16 * 16)
  moved = [s.reshape(2, 256, -1)[:, order].reshape(s.shape) if s.shape[1] == 16 else s
           for s in skips]

  def outputs(positions):
    demo_model = unet_lib.from_config(config, demo_attention_resolutions=(16,),
                                      demo_positions=positions)
    extra, extra_moved = (unet_lib.demo_context(s, (16,), positions=positions)
                          for s in (skips, moved))
    variables = {"params": randomize(jax.jit(demo_model.init)(
        jax.random.PRNGKey(0), x, t, tokens, mask, extra)["params"], seed=5)}
    apply = jax.jit(demo_model.apply)
    return (apply(variables, x, t, tokens, mask, extra),
            apply(variables, x, t, tokens, mask, extra_moved))

  plain, plain_moved = outputs(False)
  np.testing.assert_allclose(plain_moved, plain, rtol=1e-4, atol=1e-4)
  placed, placed_moved = outputs(True)
  assert np.abs(placed_moved - placed).max() > 1e-2
  assert np.abs(placed - plain).max() > 1e-2


def _attend_by_autodiff(q, k, v, mask):
  # The textbook formula, differentiated by JAX: what the hand-written backward must equal.
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None, None, :], logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1) * mask[:, None, None, :]
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


def test_attention_backward_matches_autodiff():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((3, 5, 2, 4), (3, 7, 2, 4), (3, 7, 2, 4)))
  mask = np.ones((3, 7), bool)
  mask[0, :3] = False  # some tokens dropped
  mask[1] = False  # the "null" condition: attends to nothing
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def value_and_grads(attend, q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return (out,) + vjp(cotangent)

  ours = jax.jit(lambda *a: value_and_grads(unet_lib._attend, *a))(q, k, v)
  expected = value_and_grads(_attend_by_autodiff, q, k, v)
  for got, want in zip(ours, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(ours[1])[0]).max() > 0  # the checked gradients are not all zero
  np.testing.assert_array_equal(ours[0][1], 0.0)  # the fully masked example's output...
  np.testing.assert_array_equal(ours[2][1], 0.0)  # ...and its keys' gradient
  # Under vmap (stacked experts) it is the same function.
  stacked = jax.vmap(lambda q: unet_lib._attend(q, k, v, mask))(jnp.stack([q, 2 * q]))
  np.testing.assert_allclose(stacked[1], unet_lib._attend(2 * q, k, v, mask), rtol=1e-5,
                             atol=1e-6)


def test_vmap_over_stacked_experts(tiny):
  config, model, params, apply = tiny
  x, t, tokens, mask = inputs(config)
  other = randomize(params, seed=7)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
  out = jax.jit(jax.vmap(lambda p: model.apply({"params": p}, x, t, tokens, mask)))(stacked)
  np.testing.assert_allclose(out[0], apply(params, x, t, tokens, mask), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[1], apply(other, x, t, tokens, mask), rtol=1e-4, atol=1e-4)


def test_dropout_and_bfloat16(tiny):
  _, _, params, apply = tiny
  config = load_config("tiny")
  x, t, tokens, mask = inputs(config)
  config.model.dropout = 0.5
  config.model.dtype = "bfloat16"
  model = unet_lib.from_config(config)
  run = jax.jit(lambda key: model.apply({"params": params}, x, t, tokens, mask, train=True,
                                        rngs={"dropout": key}))
  a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  assert a.dtype == jnp.float32 and np.isfinite(a).all()
  assert np.abs(a - b).max() > 0  # dropout is active in training
  # bfloat16 compute stays close to the float32 model in eval mode.
  evaluated = jax.jit(model.apply)({"params": params}, x, t, tokens, mask)
  reference = apply(params, x, t, tokens, mask)
  assert np.abs(evaluated - reference).max() < 0.1 * np.abs(reference).max()


def test_init_under_jit_and_vmap_is_deterministic():
  config = load_config("tiny")
  model = unet_lib.from_config(config)
  init = jax.jit(lambda key: model.init(key, *unet_lib.dummy_inputs(config))["params"])
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = init(keys[0]), init(keys[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  kernel = a["down"]["conv_in"]["kernel"]
  assert 0.5 < np.std(kernel) * np.sqrt(np.prod(kernel.shape[:-1])) < 1.5  # LeCun normal
  # vmap (e.g. K experts initialised at once) gives each key the params init gives it alone.
  pair = jax.jit(jax.vmap(init))(keys)
  jax.tree_util.tree_map(lambda p, q: np.testing.assert_array_equal(p[0], q), pair, a)
  assert not np.allclose(pair["down"]["conv_in"]["kernel"][0], pair["down"]["conv_in"]["kernel"][1])


def test_paper_config_has_about_2_1b_params():
  shapes = unet_lib.param_shapes(load_config("paper"))
  count = unet_lib.count_params(shapes)
  assert abs(count - 2.1e9) / 2.1e9 < 0.1, count
