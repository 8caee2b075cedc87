"""Meshes, batch sharding and a data-parallel step on 4 fake CPU devices (in a subprocess).

XLA_FLAGS=--xla_force_host_platform_device_count only takes effect before jax is imported,
and the rest of the suite runs on one device, so the multi-device checks run in a child
Python that prints OK lines.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from suti import config_lib
from suti import mesh as mesh_lib
from tests.conftest import device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_with_devices(script, n=4):
  env = {**os.environ, "XLA_FLAGS": device_flags(n),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


_DATA_PARALLEL = """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from suti import mesh as mesh_lib

  assert jax.device_count() == 4
  mesh = mesh_lib.make_mesh("data")
  assert mesh.shape == {"data": 4} and mesh_lib.needs_blocking(mesh)
  assert mesh_lib.make_mesh("expert", 2).shape == {"expert": 2}
  assert not mesh_lib.needs_blocking(mesh_lib.make_mesh("data", 1))
  print("MESH_OK")

  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(16, 5)).astype(np.float32),
           "y": rng.normal(size=(16, 1)).astype(np.float32)}
  sharded = mesh_lib.shard_batch(batch, mesh, "data")
  assert sharded["x"].sharding.spec == P("data")
  assert [s.data.shape for s in sharded["x"].addressable_shards] == [(4, 5)] * 4
  try:
    mesh_lib.shard_batch({"x": np.zeros((6, 5))}, mesh, "data")
    raise AssertionError("no error")
  except ValueError as e:
    assert "batch size 6" in str(e) and "size 4" in str(e), e
  print("SHARD_OK")

  def loss_fn(params, x, y):
    pred = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((pred - y) ** 2)

  def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  # Each device holds a quarter of the batch; the pmean inside the differentiated function
  # makes the loss (and so the gradient) the full-batch one, and the update stays replicated.
  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))
  def dp_step(params, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: jax.lax.pmean(loss_fn(p, x, y), "data"))(params)
    return sgd(params, grads), loss

  # The pitfall this avoids: with check_vma=True (the default), the gradient with respect to
  # replicated (P()) params is already summed over the axis by AD, so the old recipe
  # "value_and_grad, then pmean the grads" is axis_size times too large.
  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
  def naive_grads(params, x, y):
    return jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "data")

  @jax.jit
  def full_step(params, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return sgd(params, grads), loss

  init = {"w": jnp.asarray(rng.normal(size=(5, 1)), jnp.float32), "b": jnp.zeros((1,))}
  params = mesh_lib.replicate(init, mesh)
  ref = jax.device_put(init, jax.devices()[0])
  np.testing.assert_allclose(naive_grads(params, sharded["x"], sharded["y"])["w"],
                             4 * jax.grad(loss_fn)(ref, batch["x"], batch["y"])["w"],
                             rtol=1e-5, atol=1e-6)
  for step in range(10):
    params, loss = dp_step(params, sharded["x"], sharded["y"])
    if mesh_lib.needs_blocking(mesh):
      jax.block_until_ready((params, loss))
    ref, ref_loss = full_step(ref, batch["x"], batch["y"])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for k in ("w", "b"):
    assert params[k].sharding.is_fully_replicated
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)
  assert float(loss) < float(loss_fn(init, batch["x"], batch["y"]))
  print("DP_OK")
"""


def test_data_parallel_step_matches_full_batch():
  out = _run_with_devices(_DATA_PARALLEL)
  for line in ("MESH_OK", "SHARD_OK", "DP_OK"):
    assert line in out, out


def test_make_mesh_single_device():
  mesh = mesh_lib.make_mesh("data")
  assert mesh.axis_names == ("data",) and mesh.shape == {"data": jax.device_count()}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert not mesh_lib.needs_blocking(mesh)
  config = config_lib.base_config()
  assert mesh_lib.mesh_from_config(config, "expert").axis_names == ("expert",)


@pytest.mark.parametrize("size,message", [
    (0, "positive integer or -1 .*got 0"),
    (-2, "got -2"),
    (True, "got True"),
    (1.5, "got 1.5"),
])
def test_make_mesh_invalid_size(size, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh("data", size)


def test_make_mesh_too_many_devices():
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"'expert' of size {n + 1} .*only {n} are available"):
    mesh_lib.make_mesh("expert", n + 1)
  with pytest.raises(ValueError, match="axis name"):
    mesh_lib.make_mesh("")


def test_shard_batch_and_replicate_one_device():
  mesh = mesh_lib.make_mesh("data")
  batch = {"x": np.arange(6.0).reshape(3, 2)}
  out = mesh_lib.shard_batch(batch, mesh, "data")
  np.testing.assert_array_equal(out["x"], batch["x"])
  with pytest.raises(ValueError, match="scalar"):
    mesh_lib.shard_batch({"n": np.float32(1)}, mesh, "data")
  params = mesh_lib.replicate({"w": jnp.ones(3)}, mesh)
  assert params["w"].sharding.is_fully_replicated


def _distributed(**overrides):
  cfg = config_lib.base_config().distributed
  cfg.update(overrides)
  return cfg


def test_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))

  mesh_lib.initialize_distributed(_distributed())  # initialize=False: nothing
  assert calls == []
  mesh_lib.initialize_distributed(_distributed(initialize=True))  # all auto-detected
  assert calls == [{}]
  mesh_lib.initialize_distributed(_distributed(initialize=True))  # idempotent
  assert calls == [{}]

  calls.clear()
  full = config_lib.base_config()
  full.distributed.update(initialize=True, coordinator_address="10.0.0.1:1234",
                          num_processes=2, process_id=0)
  mesh_lib.initialize_distributed(full)  # the whole config works too
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                    "process_id": 0}]
  assert isinstance(full, ml_collections.ConfigDict)
