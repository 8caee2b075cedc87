"""Devices: multi-host start-up, 1-D named meshes, and batch placement for data parallelism.

Code names mesh axes ('data' for pretrain / apprentice, 'expert' for the experts stage) and
never counts devices itself; sizes come from `config.mesh.<axis>` (-1: all devices).

Notes on jax 0.10 for the rest of the code base:
  * shard_map is `jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...)` (also usable as a
    decorator: `@jax.shard_map(mesh=..., ...)`). `jax.experimental.shard_map` is deprecated
    since jax 0.8 and warns. An output with spec P() must be provably replicated (reduced).
  * Data-parallel gradients under shard_map (default `check_vma=True`): AD already sums the
    gradient of replicated (P()) params over the axis, so "grad, then pmean(grads)" is
    axis_size times too large. Put the reduction in the loss instead:
      loss, grads = jax.value_and_grad(lambda p: jax.lax.pmean(loss_fn(p, x, y), "data"))(p)
    which gives the full-batch loss and gradient (tests/test_mesh.py checks both facts).
  * `jax.make_mesh` now defaults to `AxisType.Explicit` axes ("sharding in types"), which
    changes how jit treats sharded arrays. `make_mesh` below asks for `AxisType.Auto`, the
    classic behaviour that `jax.jit` + NamedSharding + shard_map code expects.
"""
from __future__ import annotations

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(cfg) -> None:
  """Starts multi-host JAX when `cfg.initialize` is true; a no-op otherwise.

  `cfg` is `config.distributed` (the whole config is accepted too). Unset values (empty
  coordinator address, 0 processes, process id -1) are left for jax to auto-detect, e.g.
  from TPU VM metadata or SLURM. Calling it again after a successful start does nothing.
  """
  if "distributed" in cfg:
    cfg = cfg.distributed
  if not cfg.initialize:
    return
  if jax.distributed.is_initialized():
    logging.info("jax.distributed already initialized")
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local devices, %d devices in all",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(axis_name: str, size: int = -1, devices=None) -> Mesh:
  """A 1-D mesh with one named axis over `size` devices (-1: all of `devices`).

  `devices` defaults to `jax.devices()` (every host's devices after initialize_distributed).
  """
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f"mesh axis name must be a non-empty string, got {axis_name!r}")
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
      size < 1 and size != -1):
    raise ValueError(f"mesh size for axis {axis_name!r} must be a positive integer or -1 "
                     f"(all devices), got {size!r}")
  size = len(devices) if size == -1 else int(size)
  if size > len(devices):
    raise ValueError(f"mesh axis {axis_name!r} of size {size} needs {size} devices, but only "
                     f"{len(devices)} are available")
  return jax.make_mesh((size,), (axis_name,), axis_types=(AxisType.Auto,),
                       devices=devices[:size])


def mesh_from_config(config, axis_name: str) -> Mesh:
  """`make_mesh(axis_name, config.mesh[axis_name])`."""
  return make_mesh(axis_name, config.mesh[axis_name])


def needs_blocking(mesh: Mesh) -> bool:
  """Whether a training loop must wait for each step's result before dispatching the next.

  On CPU with several (fake, --xla_force_host_platform_device_count) devices, programs with
  collectives deadlock after a few un-awaited dispatches: the per-device threads fail to meet
  at the rendezvous, and after 40 s XLA aborts the whole process with a "termination timeout"
  (jax-ml/jax#25861; seen with jax 0.10.2 on a 4-device data-parallel loop). Blocking on each
  step costs little there; accelerators queue dispatches safely, so they keep running ahead.
  """
  return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
  """Puts every leaf's leading (batch) axis on the mesh axis, the rest replicated.

  With one process `batch` is the global batch; with several, each passes its own share
  (as a per-host grain pipeline produces) and the global array is assembled from them.
  """
  sharding = NamedSharding(mesh, P(axis))
  n = mesh.shape[axis]
  multi_process = jax.process_count() > 1

  def put(path, x):
    if np.ndim(x) == 0:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; every leaf "
                       f"needs a leading batch axis to shard over mesh axis {axis!r}")
    if multi_process:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} (leaf {jax.tree_util.keystr(path)}) is not "
                       f"divisible by mesh axis {axis!r} of size {n}")
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)


def global_array(x, sharding: NamedSharding) -> jax.Array:
  """A value every process holds in full (same bytes everywhere) -> one global jax.Array laid
  out by `sharding`; each process places only the shards its own devices hold."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put(tree, sharding: NamedSharding):
  """jax.device_put for one process; `global_array` per leaf when a job spans several."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: global_array(x, sharding), tree)


def to_host(x) -> np.ndarray:
  """The whole value of an array as numpy on every process, gathering the shards other hosts
  hold (multihost_utils.process_allgather) when it is not fully addressable here."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def is_main_process() -> bool:
  """Process 0 writes what the whole job shares (the buffer, summaries)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def replicate(tree, mesh: Mesh):
  """Copies every leaf to every device of the mesh (e.g. params for data parallelism)."""
  return put(tree, NamedSharding(mesh, P()))
