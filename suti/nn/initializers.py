"""Parameter initializers that draw their random numbers on the host.

Why: XLA:CPU compiles every `jax.random` draw of a new shape separately, and each threefry
program costs 0.2-0.8 s to compile on a small CPU; the ~150 draws of even the tiny UNet made
`model.init` take 7-25 s. These initializers hand the key to numpy through `jax.pure_callback`,
which costs nothing to compile, so init is as cheap as the forward pass. They still work under
jit, eval_shape (nothing is drawn) and vmap, and the values are a deterministic function of the
key (not the same numbers `jax.random` would give).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host_normal(key, shape, dtype, stddev):
  shape = tuple(int(d) for d in shape)

  def draw(key_data):
    rng = np.random.default_rng(np.asarray(key_data).astype(np.uint32).ravel().tolist())
    return (rng.standard_normal(shape) * stddev).astype(dtype)

  if not isinstance(key, jax.Array) or not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # legacy uint32 keys (jax.random.PRNGKey)
  return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), jax.random.key_data(key),
                           vmap_method="sequential")


def normal(stddev=0.02):
  """N(0, stddev^2), e.g. for embedding tables."""
  def init(key, shape, dtype=jnp.float32):
    return _host_normal(key, shape, dtype, stddev)
  return init


def lecun_normal(scale=1.0):
  """N(0, scale / fan_in) with fan_in = prod(shape[:-1]): right for Dense, DenseGeneral (which
  initialises a flattened [in, out] kernel) and Conv [kh, kw, in, out] kernels."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = max(1, int(np.prod(shape[:-1])))
    return _host_normal(key, shape, dtype, float(np.sqrt(scale / fan_in)))
  return init


zeros = jax.nn.initializers.zeros
