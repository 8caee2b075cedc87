"""Checkpoints: bit-exact resume, retention, atomicity, side items and error messages."""
import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from suti import checkpoint
from suti import config_lib
from tests.conftest import device_flags

NUM_STEPS, SAVE_AT = 8, 3
TABLE = np.asarray(jax.random.normal(jax.random.key(42), (100, 6)))  # example index -> features


def _init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "hidden": {"w": jax.random.normal(k1, (6, 8)) * 0.3, "b": jnp.zeros((8,))},
      # A bfloat16 leaf checks dtypes survive the round trip untouched.
      "out": {"w": (jax.random.normal(k2, (8, 2)) * 0.3).astype(jnp.bfloat16)},
  }


OPTIMIZERS = {
    "adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    # Small factoring threshold so the (6, 8) weight gets factored v_row / v_col state.
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


def _data_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def _make_train_step(opt):
  @jax.jit
  def train_step(params, opt_state, idx, key):
    x = jnp.asarray(TABLE)[idx]
    y = jnp.stack([x.sum(-1), x[:, 0] * x[:, 1]], -1)
    noise = 0.01 * jax.random.normal(key, x.shape)  # uses the rng, so resume must restore it

    def loss_fn(p):
      h = jnp.tanh((x + noise) @ p["hidden"]["w"] + p["hidden"]["b"])
      pred = h @ p["out"]["w"].astype(jnp.float32)
      return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return train_step


def _run(train_step, params, opt_state, rng, it, start, stop, ckpt=None, cfg=None):
  losses = []
  for step in range(start, stop):
    rng, key = jax.random.split(rng)
    params, opt_state, loss = train_step(params, opt_state, next(it), key)
    losses.append(np.asarray(loss))
    if ckpt is not None and step + 1 == SAVE_AT:
      ckpt.save(step + 1, params=params, opt_state=opt_state, config=cfg,
                data_state=it.get_state(),
                meta={"rng": jax.random.key_data(rng), "stage": "pretrain"})
  return params, opt_state, rng, losses


def _assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("opt_name,async_save", [("adam", False), ("adafactor", True)])
def test_resume_is_bit_identical(tmp_path, opt_name, async_save):
  opt = OPTIMIZERS[opt_name]()
  train_step = _make_train_step(opt)
  params0 = _init_params(jax.random.key(0))
  rng0 = jax.random.key(1)

  # Uninterrupted run, saving at SAVE_AT on the way.
  ckpt = checkpoint.Checkpoints(tmp_path / "ckpt", async_save=async_save)
  want_params, want_opt, _, want_losses = _run(
      train_step, params0, opt.init(params0), rng0, _data_iter(), 0, NUM_STEPS, ckpt,
      config_lib.base_config())
  ckpt.wait()
  ckpt.close()

  # "New process": templates from shapes only, a fresh iterator, the rng from meta.
  abstract_params = jax.eval_shape(_init_params, jax.random.key(0))
  abstract_opt = jax.eval_shape(opt.init, abstract_params)
  with checkpoint.Checkpoints(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == SAVE_AT
    r = ckpt.restore(params=abstract_params, opt_state=abstract_opt)
  assert r.step == SAVE_AT and r.meta["step"] == SAVE_AT and r.meta["stage"] == "pretrain"
  assert jax.tree.structure(r.opt_state) == jax.tree.structure(want_opt)  # namedtuples back
  rng = jax.random.wrap_key_data(jnp.asarray(r.meta["rng"], jnp.uint32))
  it = _data_iter()
  it.set_state(r.data_state)
  got_params, got_opt, _, got_losses = _run(
      train_step, r.params, r.opt_state, rng, it, SAVE_AT, NUM_STEPS)

  np.testing.assert_array_equal(np.stack(got_losses), np.stack(want_losses[SAVE_AT:]))
  _assert_trees_identical(got_params, want_params)
  _assert_trees_identical(got_opt, want_opt)


def test_max_to_keep_and_existing_step(tmp_path):
  params = {"w": jnp.arange(3.0)}
  with checkpoint.Checkpoints(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, params=params)
    assert ckpt.all_steps() == [4, 5]
    assert not ckpt.save(5, params=params)  # already there: skipped, not overwritten
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["4", "5"]
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpoints(tmp_path, max_to_keep=0)


def test_config_meta_and_data_state_round_trip(tmp_path):
  cfg = config_lib.base_config()
  it = _data_iter()
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert isinstance(state, dict)  # what grain's MapDataset iterators return
  expected = [next(it) for _ in range(5)]
  key = jax.random.key(7)
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(10, params={"w": jnp.ones(2)}, config=cfg, data_state=state,
              meta={"rng": jax.random.key_data(key), "stage": "experts", "round": 2})
    r = ckpt.restore(params={"w": jnp.zeros(2)})
  assert r.config == json.loads(cfg.to_json_best_effort())
  assert r.config["mesh"]["data"] == -1 and r.config["model"]["channel_mult"] == [1, 2, 2]
  assert r.meta == {"rng": np.asarray(jax.random.key_data(key)).tolist(), "stage": "experts",
                    "round": 2, "step": 10}
  assert r.opt_state is None  # no template given
  resumed = _data_iter()
  resumed.set_state(r.data_state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)


def test_data_loader_bytes_state(tmp_path):
  loader = grain.DataLoader(
      data_source=grain.sources.RangeDataSource(0, 20, 1),
      sampler=grain.samplers.IndexSampler(20, shuffle=True, seed=0, num_epochs=1),
      worker_count=0, operations=[grain.transforms.Batch(4)])
  it = iter(loader)
  next(it)
  state = it.get_state()
  assert isinstance(state, bytes)  # grain.DataLoader iterators use bytes
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, params={"w": jnp.ones(2)}, data_state=state)
    r = ckpt.restore(params={"w": jnp.ones(2)})
  assert r.data_state == state
  resumed = iter(loader)
  resumed.set_state(r.data_state)
  np.testing.assert_array_equal(next(resumed), next(it))


def test_half_written_step_is_not_latest(tmp_path):
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, params={"w": jnp.ones(2)})
  # What a crash mid-save leaves behind: orbax's temporary directory, never renamed.
  for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1712345678"):
    os.makedirs(tmp_path / name / "params")
    (tmp_path / name / "params" / "partial").write_text("x")
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    assert ckpt.restore(params={"w": jnp.zeros(2)}).step == 1
    assert ckpt.save(2, params={"w": jnp.full(2, 2.0)})  # the leftover does not block step 2
    assert ckpt.latest_step() == 2
  np.testing.assert_array_equal(checkpoint.load_params(tmp_path)["w"], [2.0, 2.0])


def test_load_params(tmp_path):
  params = {"a": {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
            "key": jax.random.key_data(jax.random.key(3))}
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(4, params=params, opt_state=optax.adam(1e-3).init(params))
    ckpt.save(9, params=jax.tree.map(lambda x: x + 1, params))
  got = checkpoint.load_params(tmp_path, step=4)  # no template: numpy, saved structure
  assert isinstance(got["a"]["w"], np.ndarray)
  _assert_trees_identical(got, jax.tree.map(np.asarray, params))
  latest = checkpoint.load_params(tmp_path, template=jax.eval_shape(lambda: params))
  assert isinstance(latest["key"], jax.Array)
  _assert_trees_identical(latest, jax.tree.map(lambda x: x + 1, params))


def test_typed_prng_keys(tmp_path):
  # Orbax stores a typed key as its key data; a typed-key template gets a typed key back.
  params = {"rng": jax.random.key(3), "w": jnp.ones(2)}
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, params=params)
    got = ckpt.restore(params=jax.eval_shape(lambda: params)).params
  assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got["rng"]),
                                jax.random.key_data(params["rng"]))
  np.testing.assert_array_equal(checkpoint.load_params(tmp_path)["rng"],
                                jax.random.key_data(params["rng"]))


def test_missing_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    checkpoint.load_params(tmp_path / "nope")
  assert not os.path.exists(tmp_path / "nope")  # reading never creates directories
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty"):
    checkpoint.load_params(tmp_path / "empty")
  with checkpoint.Checkpoints(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore(params={"w": jnp.zeros(2)}) is None
    ckpt.save(1, params={"w": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match="step 5 .*steps there: \\[1\\]"):
      ckpt.restore(params={"w": jnp.zeros(2)}, step=5)
  with pytest.raises(ValueError, match="read-only"):
    checkpoint.Checkpoints(tmp_path / "empty", read_only=True).save(2, params={})


def test_template_mismatch(tmp_path):
  params = {"dense": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    ckpt.save(1, params=params)
    cases = [
        ({"dense": {"w": jnp.ones((2, 3))}}, "in the checkpoint but not the template: "
                                             "\\['dense/b'\\]"),
        ({"dense": {**params["dense"], "g": jnp.ones(3)}}, "template but not the checkpoint: "
                                                           "\\['dense/g'\\]"),
        ({"dense": {**params["dense"], "w": jnp.ones((3, 3))}},
         "dense/w: checkpoint \\(2, 3\\) float32, template \\(3, 3\\) float32"),
        ({"dense": {**params["dense"], "b": jnp.zeros(3, jnp.bfloat16)}},
         "dense/b: checkpoint \\(3,\\) float32, template \\(3,\\) bfloat16"),
    ]
    for template, message in cases:
      with pytest.raises(ValueError, match=message):
        ckpt.restore(params=template)
    with pytest.raises(ValueError, match="has no opt_state"):
      ckpt.restore(params=params, opt_state=optax.adam(1e-3).init(params))
  with pytest.raises(ValueError, match="dense/w"):
    checkpoint.load_params(tmp_path, template={"dense": {"w": jnp.ones(1), "b": jnp.ones(3)}})


def test_meta_must_be_json(tmp_path):
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="meta must be JSON-serializable"):
      ckpt.save(1, params={"w": jnp.ones(2)}, meta={"f": object()})
    assert ckpt.latest_step() is None  # nothing half-saved


_SHARDED_SCRIPT = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from suti import checkpoint, mesh as mesh_lib
  assert jax.device_count() == 4, jax.devices()
  mesh = mesh_lib.make_mesh("data")
  x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
  with checkpoint.Checkpoints(sys.argv[1]) as ckpt:
    ckpt.save(1, params={"x": x})
    for spec in (P(), P("data"), P(None, "data")):
      sharding = NamedSharding(mesh, spec)
      template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)}
      got = ckpt.restore(params=template).params["x"]
      assert got.sharding == sharding, (got.sharding, sharding)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
  print("SHARDED_OK")
""")


def test_restore_onto_template_shardings(tmp_path):
  env = {**os.environ, "XLA_FLAGS": device_flags(4),
         "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)], env=env,
                        cwd=root, capture_output=True, text=True, timeout=120)
  assert "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
