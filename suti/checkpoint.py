"""Orbax checkpoints shared by every training stage (pretrain, experts, apprentice).

One step directory holds up to five items:
  params      pytree of arrays (orbax PyTree handler, sharded arrays supported)
  opt_state   optax state; restored into a template so namedtuples come back exactly
  config      JSON of the run's ConfigDict (informational: what produced the weights)
  data_state  the grain iterator's `get_state()`, one JSON file per process
  meta        JSON: {"step": step, ...} plus small extras (rng key data, stage name)

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames it when every item
is written, so a crash mid-save never shows up as the latest step.

Usage in a training loop:
  ckpt = Checkpoints(workdir / "ckpt", max_to_keep=2)
  if (r := ckpt.restore(params=params, opt_state=opt_state)) is not None:
    params, opt_state, step = r.params, r.opt_state, r.step
    data_iter.set_state(r.data_state)
  ...
  ckpt.save(step, params=params, opt_state=opt_state, config=cfg,
            data_state=data_iter.get_state(), meta={"rng": jax.random.key_data(rng)})
  ckpt.close()  # waits for an async save
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

_MAX_LISTED = 8  # mismatches named in an error message


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any      # None when no template was given
  config: dict | None  # None when the checkpoint has none
  data_state: Any     # pass to `iterator.set_state`; None when the checkpoint has none
  meta: dict          # always has "step"


def _handlers():
  # Fixed handlers (rather than inferring them from the save args) let a fresh manager read
  # item metadata, which `restore` uses to check templates before touching any array.
  return {
      "params": ocp.PyTreeCheckpointHandler(),
      "opt_state": ocp.PyTreeCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
      "data_state": grain.checkpoint.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
  }


def _to_json(value):
  """json.dumps `default`: arrays (e.g. `jax.random.key_data(rng)`) become nested lists."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(value).tolist()
  raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _jsonable(name, value):
  try:
    return json.loads(json.dumps(value, default=_to_json))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {name} must be JSON-serializable: {e}") from None


def _config_dict(config):
  if hasattr(config, "to_json_best_effort"):  # ml_collections ConfigDict / FrozenConfigDict
    return json.loads(config.to_json_best_effort())
  return _jsonable("config", dict(config))


_BYTES_KEY = "__bytes__"


class _StateBox:
  """Carries a data-iterator state snapshot through grain's orbax handler.

  grain's handler writes one `process_<i>-of-<n>.json` per process (each host has its own
  data position), but it wants a live iterator. Saving a snapshot instead keeps async saves
  correct while the loop advances the iterator. `grain.MapDataset` iterators' states are JSON
  dicts; `grain.DataLoader` iterators' states are bytes, stored as text and returned as bytes.
  """

  def __init__(self, state=None):
    self.state = state

  def get_state(self) -> bytes:
    state = self.state
    if isinstance(state, bytes):
      state = {_BYTES_KEY: state.decode()}
    return json.dumps(state, default=_to_json).encode()

  def set_state(self, raw: bytes):
    state = json.loads(raw)
    if isinstance(state, dict) and set(state) == {_BYTES_KEY}:
      state = state[_BYTES_KEY].encode()
    self.state = state

  def start_prefetch(self):  # called by grain's handler after set_state
    pass


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree, is_leaf=None) -> dict[str, Any]:
  # Orbax stores namedtuples as dicts and tuples as lists; naming every key by its field name
  # or index makes a template's paths comparable with the checkpoint's.
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _dtype(x):
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _as_stored(x):
  # Orbax stores typed PRNG keys (jax.random.key) as their uint32 key data.
  if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, x)
  return x


def _check_template(name, template, metadata, where):
  """Raises ValueError naming every path whose presence, shape or dtype differs.

  Orbax would silently cast a template of another dtype, so resuming could not be exact.
  """
  saved = _flat(metadata.tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  wanted = {path: _as_stored(x) for path, x in _flat(template).items()}
  problems = []
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing:
    problems.append(f"in the template but not the checkpoint: {missing[:_MAX_LISTED]}")
  if extra:
    problems.append(f"in the checkpoint but not the template: {extra[:_MAX_LISTED]}")
  differ = []
  for path in sorted(set(saved) & set(wanted)):
    s, w = saved[path], wanted[path]
    s_shape, w_shape = tuple(s.shape), tuple(np.shape(w))
    if s_shape != w_shape or np.dtype(s.dtype) != _dtype(w):
      differ.append(f"{path}: checkpoint {s_shape} {np.dtype(s.dtype)}, "
                    f"template {w_shape} {_dtype(w)}")
  if differ:
    problems.append("shape/dtype differ: " + "; ".join(differ[:_MAX_LISTED]))
  if problems:
    raise ValueError(f"{name} template does not match the checkpoint {where}: "
                     + " | ".join(problems))


def _restore_args(template):
  """PyTreeRestore args placing each leaf like its template leaf.

  Arrays and ShapeDtypeStructs with a sharding restore onto it; a ShapeDtypeStruct without one
  goes to the first local device; numpy leaves restore as numpy.
  """
  def fill(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x
  template = jax.tree.map(fill, template)
  return ocp.args.PyTreeRestore(
      template, restore_args=ocp.checkpoint_utils.construct_restore_args(template))


def _numpy_restore_args(metadata):
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
  return ocp.args.PyTreeRestore(restore_args=restore_args)


def _local(directory):
  # Orbax wants absolute paths; leave remote URIs (gs://...) alone.
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpoints:
  """A directory of numbered checkpoints; wraps `ocp.CheckpointManager`.

  `async_save=True` returns from `save` once arrays are copied to host and writes in the
  background; the next `save`, `wait()` or `close()` waits for it.
  `read_only=True` opens an existing directory without creating or deleting anything.
  """

  def __init__(self, directory, *, max_to_keep: int = 2, async_save: bool = False,
               read_only: bool = False):
    self.directory = _local(directory)
    if read_only and not os.path.isdir(self.directory) and "://" not in self.directory:
      raise FileNotFoundError(f"no checkpoint directory {self.directory}")
    if not read_only and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                          or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
    self.read_only = read_only
    # read_only is enforced here rather than with orbax's option, which logs warnings.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        enable_async_checkpointing=async_save,  # orbax defaults to True; we opt in explicitly
        create=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                          options=options)

  @classmethod
  def from_config(cls, directory, config, **kwargs) -> Checkpoints:
    """Uses `config.checkpoint.max_to_keep` and `config.checkpoint.async_save`."""
    return cls(directory, max_to_keep=config.checkpoint.max_to_keep,
               async_save=config.checkpoint.async_save, **kwargs)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, params, opt_state=None, config=None, data_state=None,
           meta: dict | None = None) -> bool:
    """Saves one step; returns False (and writes nothing) when that step already exists.

    Every save is written (no save-interval policy): callers decide when to save.
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only; cannot save step {step}")
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("checkpoint step %d already exists in %s; not saving it again", step,
                   self.directory)
      return False
    meta = _jsonable("meta", {**(meta or {}), "step": step})
    items = {"params": ocp.args.PyTreeSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.PyTreeSave(opt_state)
    if config is not None:
      items["config"] = ocp.args.JsonSave(_config_dict(config))
    if data_state is not None:
      if not isinstance(data_state, bytes):  # a JSON copy: checked now, immune to later changes
        data_state = _jsonable("data_state", data_state)
      items["data_state"] = grain.checkpoint.CheckpointSave(_StateBox(data_state))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _require_step(self, step):
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps there: {self.all_steps()}")

  def _metadata(self, step):
    return dict(self._manager.item_metadata(step))  # only the items this step has

  def restore(self, *, params, opt_state=None, step: int | None = None,
              data_state: bool = True) -> Restored | None:
    """Restores `step` (default: the latest) into the templates; None when there is none.

    `params` / `opt_state` are templates: arrays or `jax.ShapeDtypeStruct`s whose structure,
    shapes and dtypes must match the checkpoint exactly (ValueError otherwise); restored
    arrays get the template's sharding. Without an `opt_state` template none is restored.
    """
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    step = int(step)
    self._require_step(step)
    metadata = self._metadata(step)
    where = f"step {step} in {self.directory}"
    items = {"meta": ocp.args.JsonRestore()}
    _check_template("params", params, metadata["params"], where)
    items["params"] = _restore_args(params)
    if opt_state is not None:
      if "opt_state" not in metadata:
        raise ValueError(f"an opt_state template was given but the checkpoint {where} has no "
                         f"opt_state")
      _check_template("opt_state", opt_state, metadata["opt_state"], where)
      items["opt_state"] = _restore_args(opt_state)
    if "config" in metadata:
      items["config"] = ocp.args.JsonRestore()
    # data_state=False: params only (another job, e.g. a base model read by a later stage
    # with a different process count, whose data position means nothing here).
    if data_state and "data_state" in metadata:
      items["data_state"] = grain.checkpoint.CheckpointRestore(_StateBox())
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(
        step=step,
        params=out["params"],
        opt_state=out["opt_state"] if opt_state is not None else None,
        config=out["config"] if "config" in items else None,
        data_state=out["data_state"].state if "data_state" in items else None,
        meta=dict(out["meta"]),
    )

  def read_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest), without reading any array; None
    when there are no steps or the step has no config."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return None
    self._require_step(step)
    if "config" not in self._metadata(step):
      return None
    out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(out["config"])

  def wait(self):
    """Blocks until an async save has been fully written (and renamed into place)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_params(directory, step: int | None = None, template=None):
  """The params of one checkpoint (default: the latest) in `directory`, e.g. a base model.

  With a template, restores like `Checkpoints.restore` (exact match, template shardings);
  without one, returns the saved tree with numpy arrays. FileNotFoundError when the directory
  or the step does not exist.
  """
  ckpt = Checkpoints(directory, read_only=True)
  try:
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoints in {ckpt.directory}")
    step = int(step)
    ckpt._require_step(step)
    metadata = ckpt._metadata(step)["params"]
    if template is None:
      args = _numpy_restore_args(metadata)
    else:
      _check_template("params", template, metadata, f"step {step} in {ckpt.directory}")
      args = _restore_args(template)
    return ckpt._manager.restore(step, args=ocp.args.Composite(params=args))["params"]
  finally:
    ckpt.close()
