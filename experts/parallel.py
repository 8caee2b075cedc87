"""K subject experts fine-tuned in one compiled step, then sampled (SuTI Algorithm 1, lines 3-6).

Every expert starts from the base UNet, fine-tunes on ONE subject's cluster with the denoising
loss (no prior preservation) and draws pseudo-targets for that subject's unseen prompts with
guided DDPM. Only `trainable['unet']` is per expert; the text encoder (frozen T5 in the paper,
or the world encoder trained with the base) is shared and not fine-tuned.

Layout. K experts are ONE pytree whose leaves have a leading axis K (`stack_experts`). On the
mesh axis 'expert' of D devices each device holds E = experts_per_device of them, so a round
has K_padded = D * E slots; a round with fewer subjects fills the rest with copies (`pad_to`)
whose results are dropped. Stacked params, optimizer state, batches and expert ids are
sharded P('expert') on the leading axis; shared text params are replicated P(). There are no
collectives: experts never talk to each other.

Packing E experts on one device (`pack`):
  'vmap'    jax.vmap over the E experts. A convolution whose kernel is batched becomes ONE
            grouped convolution (experts folded into feature_group_count, as the HLO shows),
            the native form on TPU / GPU. XLA:CPU runs grouped convolutions ~4x slower per
            expert than the same convolutions one by one.
  'split'   jax.vmap, except that each convolution with per-expert kernels is split into E
            ordinary convolutions (a batching rule swapped in while the step is traced; the
            result is identical). Everything else stays batched. The fast choice on CPU.
  'map'     jax.lax.map over the experts inside the step: one per-expert program in a loop.
            Slow on XLA:CPU, which emits the kernel-gradient convolutions of a while-loop body
            without its fast convolution library.
  'unroll'  a Python loop over the E experts inside the step: E copies of the per-expert
            program. Compile time and compile memory grow with E (tens of GB at E = 8).
  'auto'    'split' on CPU, 'vmap' elsewhere.
E = 1 always runs the plain per-expert program. benchmarks/bench_experts.py measures them.

Randomness. Expert k's noise at step s of round r comes from
fold_in(fold_in(fold_in(PRNGKey(seed), r), k), s) and its batch from numpy's
default_rng([seed, r, k, s]), with k the expert's global slot in the round: results do not
depend on how experts are laid out over devices, and a resumed round redraws the same numbers.

Failures. An expert whose loss (or gradient) is not finite keeps its params and optimizer state
for that step (a lax.cond around the update) and reports the non-finite loss; the others go on.
`finetune_and_sample` flags it, so the caller can drop its sample.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from suti import diffusion
from suti import mesh as mesh_lib
from suti import train_lib
from suti.data.types import SubjectCluster
from suti.model import TextToImage
from suti.nn.unet import count_params

log = logging.getLogger("suti.experts")

AXIS = "expert"
PACKS = ("auto", "vmap", "split", "map", "unroll")


# ------------------------------------------------------------------------------ layout

def layout(num_experts: int, num_devices: int, experts_per_device: int = 0) -> tuple[int, int]:
  """(E experts per device, K_padded = num_devices * E slots) for K experts on D devices."""
  if num_experts < 1 or num_devices < 1:
    raise ValueError(f"need at least one expert and one device, got K={num_experts}, "
                     f"D={num_devices}")
  per_device = experts_per_device or math.ceil(num_experts / num_devices)
  if per_device * num_devices < num_experts:
    raise ValueError(f"experts.experts_per_device={experts_per_device} on {num_devices} "
                     f"device(s) holds {per_device * num_devices} experts, fewer than "
                     f"experts.num_experts={num_experts}")
  return per_device, per_device * num_devices


def resolve_pack(pack: str, experts_per_device: int, platform: str | None = None) -> str:
  """'auto' -> 'split' on CPU, else 'vmap' (see the module docstring); E = 1 -> 'unroll'."""
  if pack not in PACKS:
    raise ValueError(f"pack must be one of {PACKS}, got {pack!r}")
  if experts_per_device == 1:
    return "unroll"
  if pack == "auto":
    pack = "split" if (platform or jax.default_backend()) == "cpu" else "vmap"
  if pack == "split" and _conv_batchers() is None:
    log.warning("pack='split' needs jax's private conv batching rule table, which this "
                "jax (%s) lacks; using 'vmap'", jax.__version__)
    return "vmap"
  return pack


def _conv_batchers():
  """(rule table, conv primitive) from jax's internals, or None where they moved."""
  try:
    from jax._src.interpreters import batching  # pylint: disable=import-outside-toplevel
    from jax._src.lax import convolution  # pylint: disable=import-outside-toplevel
    table, prim = batching.fancy_primitive_batchers, convolution.conv_general_dilated_p
  except (ImportError, AttributeError):
    return None
  return (table, prim) if prim in table else None


@contextlib.contextmanager
def _split_convolutions():
  """While active, vmap turns a convolution with batched kernels into one convolution per
  kernel (stacked) instead of one grouped convolution. Only tracing is affected."""
  table, prim = _conv_batchers()
  grouped = table[prim]

  def split(axis_data, args, dims, **params):
    (lhs, rhs), (lhs_dim, rhs_dim) = args, dims
    if rhs_dim is None:  # shared kernel: the default rule folds experts into the batch
      return grouped(axis_data, args, dims, **params)
    rhs = jnp.moveaxis(rhs, rhs_dim, 0)
    lhs = lhs if lhs_dim is None else jnp.moveaxis(lhs, lhs_dim, 0)
    outs = [prim.bind(lhs if lhs_dim is None else lhs[i], rhs[i], **params)
            for i in range(rhs.shape[0])]
    return jnp.stack(outs), 0

  table[prim] = split
  try:
    yield
  finally:
    table[prim] = grouped


def stack_experts(unet_params, num_experts: int, mesh=None):
  """K copies of the base UNet params, one pytree with a leading axis K.

  With a mesh the copies are made on the devices, already sharded P('expert').
  """
  def stack(p):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_experts,) + x.shape), p)

  if mesh is None:
    return jax.jit(stack)(unet_params)
  if jax.process_count() > 1:  # the base sits on this host's device: make it a global array
    unet_params = mesh_lib.replicate(unet_params, mesh)
  return jax.jit(stack, out_shardings=NamedSharding(mesh, P(AXIS)))(unet_params)


def unstack_expert(stacked, index: int):
  """Expert `index`'s params out of the stack."""
  return jax.tree.map(lambda x: x[index], stacked)


def split_base(trainable: dict, frozen: dict) -> tuple[dict, dict]:
  """Base (trainable, frozen) -> (unet params, shared): what experts fine-tune and share."""
  shared = {"trainable": {k: v for k, v in trainable.items() if k != "unet"},
            "frozen": frozen}
  return trainable["unet"], shared


def shard_experts(tree, mesh):
  """Every leaf's leading (expert) axis on the mesh's 'expert' axis."""
  return mesh_lib.put(tree, NamedSharding(mesh, P(AXIS)))


def init_opt_state(tx: optax.GradientTransformation, stacked_unet, mesh=None):
  """Per-expert optimizer state, stacked like the params (Adafactor factors per expert)."""
  init = jax.vmap(tx.init)
  if mesh is None:
    return jax.jit(init)(stacked_unet)
  return jax.jit(init, out_shardings=NamedSharding(mesh, P(AXIS)))(stacked_unet)


def _packed(fn: Callable, pack: str, in_axes: Sequence[int | None]) -> Callable:
  """fn over one expert -> fn over the E experts of a device (leading axis on in_axes=0)."""
  if pack == "vmap":
    return jax.vmap(fn, in_axes=tuple(in_axes))
  if pack == "split":
    def split(*args):
      with _split_convolutions():
        return jax.vmap(fn, in_axes=tuple(in_axes))(*args)
    return split
  if pack == "map":
    def mapped(*args):
      def body(xs):
        it = iter(xs)
        return fn(*[next(it) if ax == 0 else a for a, ax in zip(args, in_axes)])
      return jax.lax.map(body, [a for a, ax in zip(args, in_axes) if ax == 0])
    return mapped

  def unrolled(*args):
    size = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
    outs = []
    for i in range(size):
      sliced = [jax.tree.map(lambda x, i=i: x[i], a) if ax == 0 else a
                for a, ax in zip(args, in_axes)]
      outs.append(fn(*sliced))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def _on_mesh(fn: Callable, mesh, in_specs, out_specs) -> Callable:
  if mesh is None:
    return fn
  # check_vma=False: experts never communicate, so there is nothing for the varying-axes
  # check to protect, and it rejects the NaN guard's lax.cond (whose keep branch returns the
  # inputs unchanged, typed differently from the updated ones).
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _experts_per_device(args_leading: int, mesh) -> int:
  return args_leading // (mesh.shape[AXIS] if mesh is not None else 1)


# ------------------------------------------------------------------------------ training

def expert_rng(base_rng, round_, expert_id, step):
  """The noise key of one expert at one step: independent of the device layout."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_rng, round_),
                                               expert_id), step)


def _tree_all_finite(tree) -> jax.Array:
  """Whether every leaf is all finite, combined by a dot, not jnp.all.

  Under vmap the NaN guard's cond becomes a select per param and optimizer leaf, and XLA
  rewrote a boolean reduction over the leaves' flags into elementwise 'and's that it then
  fused into every one of those selects: ~10^5 instructions, which made the packed step's
  compile 4-7x the single expert's (demo UNet, 8 experts: 203 s; with the dot, 62 s).
  XLA does not fuse a dot into its elementwise consumers."""
  flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  flags = flags.astype(jnp.float32)
  return jnp.dot(flags, jnp.ones_like(flags)) == flags.shape[0]


def make_single_step(model: TextToImage, tx: optax.GradientTransformation, seed: int):
  """One expert's update (unjitted): (unet, opt_state, shared, batch [B, ...], step, expert_id,
  round) -> (unet, opt_state, loss). A non-finite loss or gradient leaves unet and opt_state
  as they were and comes back as a NaN loss."""
  base_rng = jax.random.PRNGKey(seed)

  def step_fn(unet, opt_state, shared, batch, step, expert_id, round_):
    rng = expert_rng(base_rng, round_, expert_id, step)
    loss_fn = lambda u: model.loss(dict(shared["trainable"], unet=u), shared["frozen"], batch,
                                   rng)
    loss, grads = jax.value_and_grad(loss_fn)(unet)
    ok = jnp.isfinite(loss) & _tree_all_finite(grads)

    def update(state):
      unet, opt_state = state
      updates, opt_state = tx.update(grads, opt_state, unet)
      return optax.apply_updates(unet, updates), opt_state

    # A cond, not jnp.where over every leaf: for the paper's 2.1B UNet the where-guarded step
    # did not finish compiling on XLA:CPU within 24 GB (the cond one: ~2 GB, like pretrain's).
    # Under vmap (E > 1 per device) the cond becomes that select anyway.
    unet, opt_state = jax.lax.cond(ok, update, lambda state: state, (unet, opt_state))
    return unet, opt_state, jnp.where(ok, loss, jnp.nan)

  return step_fn


def make_expert_train_step(model: TextToImage, tx: optax.GradientTransformation, seed: int,
                           mesh=None, pack: str = "auto", donate: bool = True):
  """The packed update of all experts, jitted:

    fn(stacked_unet, opt_state, shared, batch, step, expert_ids, round)
      -> (stacked_unet, opt_state, loss [K])

  stacked_unet / opt_state: leading axis K (sharded P('expert') when `mesh` is given);
  shared: `split_base`'s (replicated); batch: {'image' [K, B, H, W, 3], 'ids', 'mask'
  [K, B, L]}; step, round: int scalars; expert_ids: int32 [K], each slot's global id.
  Without a mesh the K experts are one pack on the default device. Params and optimizer
  state are donated unless donate=False.
  """
  single = make_single_step(model, tx, seed)
  in_axes = (0, 0, None, 0, None, 0, None)
  spec = lambda ax: P(AXIS) if ax == 0 else P()
  compiled = {}

  def step_fn(stacked_unet, opt_state, shared, batch, step, expert_ids, round_):
    size = jax.tree.leaves(stacked_unet)[0].shape[0]
    per_device = _experts_per_device(size, mesh)
    if per_device not in compiled:
      packed = _packed(single, resolve_pack(pack, per_device, _platform(mesh)), in_axes)
      fn = _on_mesh(packed, mesh, tuple(spec(a) for a in in_axes), (P(AXIS),) * 3)
      compiled[per_device] = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
    return compiled[per_device](stacked_unet, opt_state, shared, batch,
                                jnp.asarray(step, jnp.int32), jnp.asarray(expert_ids, jnp.int32),
                                jnp.asarray(round_, jnp.int32))

  return step_fn


def _platform(mesh) -> str:
  return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def make_sequential_step(model: TextToImage, tx: optax.GradientTransformation, seed: int):
  """The baseline: one expert at a time, (unet, opt_state, shared, batch [B, ...], step,
  expert_id, round) -> (unet, opt_state, loss), jitted once and reused for every expert."""
  single = jax.jit(make_single_step(model, tx, seed), donate_argnums=(0, 1))
  return lambda unet, opt_state, shared, batch, step, expert_id, round_: single(
      unet, opt_state, shared, batch, jnp.int32(step), jnp.int32(expert_id), jnp.int32(round_))


# ------------------------------------------------------------------------------ data

def cluster_arrays(clusters: Sequence[SubjectCluster], tokenize: Callable) -> list[dict]:
  """Each cluster once as model inputs: {'image' float32 [N, H, W, 3] in [-1, 1], 'ids',
  'mask' [N, L]} (the caption of each image), for `expert_batches`."""
  out = []
  for cluster in clusters:
    if not cluster.images:
      raise ValueError(f"subject {cluster.subject_id!r} has no images")
    tokens = tokenize(cluster.captions)
    out.append({"image": train_lib.to_model_space(np.stack(cluster.images)),
                "ids": np.asarray(tokens["ids"]), "mask": np.asarray(tokens["mask"])})
  return out


def expert_batches(clusters, batch_size: int, step: int, seed: int, round_: int, *,
                   tokenize: Callable | None = None, expert_ids: Sequence[int] | None = None
                   ) -> dict:
  """One step's batches of every expert: {'image' [K, B, H, W, 3] in [-1, 1], 'ids', 'mask'}.

  clusters: K SubjectClusters (then `tokenize`, e.g. model.tokenize, is required) or
  `cluster_arrays`' output. Expert k draws B of its own (image, caption) pairs, without
  replacement when the cluster has at least B, from default_rng([seed, round, id_k, step]):
  deterministic, and the same whichever device the expert sits on.
  """
  if clusters and isinstance(clusters[0], SubjectCluster):
    if tokenize is None:
      raise ValueError("expert_batches needs tokenize= to turn captions into token ids")
    clusters = cluster_arrays(clusters, tokenize)
  ids = range(len(clusters)) if expert_ids is None else expert_ids
  if len(ids) != len(clusters):
    raise ValueError(f"{len(clusters)} clusters but {len(ids)} expert ids")
  parts = []
  for arrays, expert_id in zip(clusters, ids):
    n = arrays["image"].shape[0]
    rng = np.random.default_rng([seed, round_, int(expert_id), step])
    pick = rng.choice(n, batch_size, replace=n < batch_size)
    parts.append({k: v[pick] for k, v in arrays.items()})
  return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def pad_to(items: Sequence, size: int) -> list:
  """items followed by copies of its last one, `size` in all (padding slots of a round)."""
  if not items:
    raise ValueError("nothing to pad: a round needs at least one subject")
  if len(items) > size:
    raise ValueError(f"{len(items)} subjects do not fit {size} expert slots")
  return list(items) + [items[-1]] * (size - len(items))


# ------------------------------------------------------------------------------ sampling

def make_expert_sampler(model: TextToImage, *, sampler: str = "ddpm", steps: int | None = 100,
                        guidance: float = 30.0, threshold: str = "dynamic", mesh=None,
                        pack: str = "auto"):
  """Guided sampling by every expert, jitted:

    fn(stacked_unet, shared, tokens {'ids', 'mask'} [K, S, L], rng, expert_ids [K])
      -> images float32 [K, S, H, W, 3] in [-1, 1]

  Expert k draws its S images from its own prompts with classifier-free guidance against the
  null prompt (`model.null_tokens`), weight `guidance`, with key fold_in(rng, expert_ids[k]).
  Use `sampler_from_config` for config.experts' sampler, steps and guidance.
  """
  schedule = diffusion.respace(model.schedule, steps)  # eagerly, outside any trace
  percentile = model.config.diffusion.dynamic_threshold_percentile
  size = model.image_size
  guided = guidance != 1.0

  def single(unet, shared, tokens, rng, expert_id):
    trainable = dict(shared["trainable"], unet=unet)
    count = tokens["ids"].shape[0]
    cond = model.encode(trainable, shared["frozen"], tokens)
    conds, weights = [cond], []
    if guided:
      null = jax.tree.map(jnp.asarray, model.null_tokens(count))
      conds, weights = [model.encode(trainable, shared["frozen"], null), cond], [guidance]
    return diffusion.sample(model.denoise_fn, unet, schedule, conds,
                            jax.random.fold_in(rng, expert_id), (count, size, size, 3),
                            weights=weights, sampler=sampler, steps=None,
                            prediction=model.prediction, threshold=threshold,
                            percentile=percentile)

  in_axes = (0, None, 0, None, 0)
  spec = lambda ax: P(AXIS) if ax == 0 else P()
  compiled = {}

  def sample_fn(stacked_unet, shared, tokens, rng, expert_ids):
    num = jax.tree.leaves(stacked_unet)[0].shape[0]
    per_device = _experts_per_device(num, mesh)
    if per_device not in compiled:
      packed = _packed(single, resolve_pack(pack, per_device, _platform(mesh)), in_axes)
      compiled[per_device] = jax.jit(_on_mesh(packed, mesh, tuple(spec(a) for a in in_axes),
                                              P(AXIS)))
    tokens = {"ids": jnp.asarray(tokens["ids"], jnp.int32),
              "mask": jnp.asarray(tokens["mask"], bool)}
    return compiled[per_device](stacked_unet, shared, tokens, rng,
                                jnp.asarray(expert_ids, jnp.int32))

  return sample_fn


def sampler_from_config(model: TextToImage, config, mesh=None, pack: str = "auto"):
  """`make_expert_sampler` with config.experts' sampler, sample_steps and guidance."""
  ec = config.experts
  return make_expert_sampler(model, sampler=ec.sampler, steps=ec.sample_steps,
                             guidance=ec.guidance, mesh=mesh, pack=pack)


# ------------------------------------------------------------------------------ one round

def default_prompts(clusters: Sequence[SubjectCluster]) -> list[list[str]]:
  """Each subject's first unseen prompt (its caption when it has none)."""
  return [[c.prompts[0] if c.prompts else c.captions[0]] for c in clusters]


_ROUND_FUNCTIONS: dict = {}


def round_functions(config, model: TextToImage, mesh=None, pack: str = "auto"):
  """(tx, train step, sampler) for config.experts, built once and reused by every round.

  Each round calling make_expert_train_step / make_expert_sampler anew would give fresh
  jax.jit objects, i.e. a retrace and recompile per round (minutes on CPU). One entry is
  kept: a stage runs one (config, model, mesh) at a time. Models are compared by what their
  programs are made of, not by identity: evaluate's experts, in the same process as stage
  experts, reuse its compiled step (on CPU a 16-expert step compiles for ~2 minutes).
  """
  ec = config.experts
  key = (model.signature(), mesh, pack, config.seed, ec.optimizer, float(ec.learning_rate),
         ec.sampler, ec.sample_steps, float(ec.guidance))
  if key not in _ROUND_FUNCTIONS:
    _ROUND_FUNCTIONS.clear()
    tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
    _ROUND_FUNCTIONS[key] = (tx, make_expert_train_step(model, tx, config.seed, mesh=mesh,
                                                        pack=pack),
                             sampler_from_config(model, config, mesh=mesh, pack=pack))
  return _ROUND_FUNCTIONS[key]


def finetune(config, model: TextToImage, base_unet, shared, clusters, round_: int, mesh=None,
             *, num_steps: int | None = None, pack: str = "auto", callback=None):
  """Fine-tunes one expert per cluster from the base UNet, packed.

  Returns (stacked_unet [K_padded, ...], last losses [K], finite [K] bool): K = len(clusters),
  finite is False for an expert that had a non-finite loss at any step. The padding slots
  (copies of the last cluster) are trained too and dropped from the losses.
  callback(step, losses [K_padded]) runs after each step (e.g. a progress bar).
  """
  ec = config.experts
  devices = mesh.shape[AXIS] if mesh is not None else 1
  _, padded = layout(max(ec.num_experts, len(clusters)), devices,
                     ec.experts_per_device)
  num_steps = ec.num_steps if num_steps is None else num_steps
  arrays = pad_to(cluster_arrays(clusters, model.tokenize), padded)
  expert_ids = np.arange(padded, dtype=np.int32)
  tx, step_fn, _ = round_functions(config, model, mesh, pack)
  stacked = stack_experts(base_unet, padded, mesh)
  opt_state = init_opt_state(tx, stacked, mesh)
  if mesh is not None:
    shared = mesh_lib.replicate(shared, mesh)
  place = (lambda x: shard_experts(x, mesh)) if mesh is not None else jax.device_put
  block = mesh is not None and mesh_lib.needs_blocking(mesh)
  finite = jnp.ones((padded,), bool)
  losses = jnp.full((padded,), jnp.nan)
  for step in range(num_steps):
    batch = place(expert_batches(arrays, ec.batch_size, step, config.seed, round_,
                                 expert_ids=expert_ids))
    stacked, opt_state, losses = step_fn(stacked, opt_state, shared, batch, step,
                                         place(expert_ids), round_)
    finite = finite & jnp.isfinite(losses)
    if block:  # CPU with several devices: see mesh.needs_blocking
      jax.block_until_ready((stacked, losses))
    if callback is not None:
      callback(step, losses)
  n = len(clusters)
  return stacked, mesh_lib.to_host(losses)[:n], mesh_lib.to_host(finite)[:n]


def finetune_and_sample(config, model: TextToImage, base_unet, shared, clusters, round_: int,
                        mesh=None, *, prompts: Sequence[Sequence[str]] | None = None,
                        num_steps: int | None = None, pack: str = "auto", callback=None,
                        sample_rng=None):
  """SuTI Algorithm 1 for one round: K experts fine-tuned (config.experts.num_steps steps),
  then each draws config.experts.samples_per_prompt images of each of its prompts.

  prompts: per cluster, the same number P of prompts (default: `default_prompts`).
  Returns (images uint8 [K, P * samples_per_prompt, H, W, 3] (prompt-major), last losses [K],
  finite [K] bool): finite is False for an expert with a non-finite loss at any step or a
  non-finite sample; drop its images.
  """
  ec = config.experts
  prompts = default_prompts(clusters) if prompts is None else [list(p) for p in prompts]
  if len(prompts) != len(clusters) or len({len(p) for p in prompts}) != 1 or not prompts[0]:
    raise ValueError("prompts must give the same number (>= 1) of prompts for every cluster")
  stacked, losses, finite = finetune(config, model, base_unet, shared, clusters, round_, mesh,
                                     num_steps=num_steps, pack=pack, callback=callback)
  padded = jax.tree.leaves(stacked)[0].shape[0]
  per_expert = [[p for p in ps for _ in range(ec.samples_per_prompt)] for ps in prompts]
  tokens = [model.tokenize(p) for p in pad_to(per_expert, padded)]
  tokens = {k: np.stack([t[k] for t in tokens]) for k in ("ids", "mask")}
  expert_ids = np.arange(padded, dtype=np.int32)
  if mesh is not None:
    tokens, expert_ids = shard_experts((tokens, expert_ids), mesh)
    shared = mesh_lib.replicate(shared, mesh)
  _, _, sample = round_functions(config, model, mesh, pack)
  if sample_rng is None:
    sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), round_)
  images = mesh_lib.to_host(sample(stacked, shared, tokens, sample_rng,
                                   expert_ids))[:len(clusters)]
  finite = finite & np.all(np.isfinite(images.reshape(len(clusters), -1)), axis=-1)
  return train_lib.to_uint8(np.nan_to_num(images)), losses, finite


def finetune_sequential(config, model: TextToImage, base_unet, shared, clusters, round_: int,
                        *, num_steps: int | None = None, callback=None):
  """The baseline: the same experts, same batches and noise, fine-tuned one after another
  with the unpacked jitted step. Returns (stacked_unet [K, ...], last losses [K])."""
  ec = config.experts
  num_steps = ec.num_steps if num_steps is None else num_steps
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  step_fn = make_sequential_step(model, tx, config.seed)
  arrays = cluster_arrays(clusters, model.tokenize)
  experts, losses = [], []
  for k, cluster in enumerate(arrays):
    unet = jax.tree.map(jnp.copy, base_unet)
    opt_state = tx.init(unet)
    loss = jnp.nan
    for step in range(num_steps):
      batch = expert_batches([cluster], ec.batch_size, step, config.seed, round_,
                             expert_ids=[k])
      batch = jax.tree.map(lambda x: x[0], batch)
      unet, opt_state, loss = step_fn(unet, opt_state, shared, batch, step, k, round_)
      if callback is not None:
        callback(k, step, loss)
    experts.append(unet)
    losses.append(loss)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *experts)
  return stacked, np.asarray(jnp.stack(losses))


# ------------------------------------------------------------------------------ plan rows

def device_experts(config, num_devices: int) -> int:
  """Experts per device: experts.experts_per_device, else K spread over `num_devices` (the
  plan's devices need not be the expert stage's: the paper runs K=400 on 400 cores)."""
  ec = config.experts
  return ec.experts_per_device or math.ceil(ec.num_experts / num_devices)


def plan_rows(config, ctx) -> list:
  """suti.plan rows: one device's expert train step (E experts, each experts.batch_size
  examples, config.experts.optimizer) and one guided step of their sampler."""
  from suti import plan  # pylint: disable=import-outside-toplevel  (plan imports stages lazily)

  ec = config.experts
  per_device = device_experts(config, ctx.num_devices)
  model, trainable, frozen = plan.abstract_model(config)
  unet, shared = split_base(trainable, frozen)
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((per_device,) + x.shape, x.dtype), unet)
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  opt_state = jax.eval_shape(jax.vmap(tx.init), stacked)
  stack = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((per_device,) + x.shape, x.dtype), tree)
  batch = stack(plan.abstract_batch(config, model, ec.batch_size))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  ids = jax.ShapeDtypeStruct((per_device,), jnp.int32)
  platform = ctx.device.platform if ctx.device is not None else jax.default_backend()
  pack = resolve_pack("auto", per_device, platform)
  train = _packed(make_single_step(model, tx, config.seed), pack,
                  (0, 0, None, 0, None, 0, None))
  unet_params = count_params(unet)
  info = {"num_experts": ec.num_experts, "experts_per_device": per_device, "pack": pack}
  rows = [plan.Program(
      "experts", "expert_train", train,
      (stacked, opt_state, shared, batch, scalar, ids, scalar),
      params=per_device * unet_params, batch_per_device=per_device * ec.batch_size,
      donate_argnums=(0, 1),
      info=dict(info, optimizer=ec.optimizer, batch_per_expert=ec.batch_size))]

  # One guided step (a one-step chain: one UNet call on 2 * S images per expert), from
  # pre-encoded conditions as in plan.sample_program.
  count = ec.prompts_per_subject * ec.samples_per_prompt  # images per expert
  schedule = diffusion.respace(model.schedule, 1)
  shape = (count, config.image_size, config.image_size, 3)
  guided = ec.guidance != 1.0
  weights = [ec.guidance] if guided else []

  def sample_one(unet, conds, rng, expert_id):
    return diffusion.sample(model.denoise_fn, unet, schedule, conds,
                            jax.random.fold_in(rng, expert_id), shape, weights=weights,
                            sampler=ec.sampler, steps=None, prediction=model.prediction,
                            percentile=config.diffusion.dynamic_threshold_percentile)

  conds = tuple(stack(plan.abstract_cond(config, count)) for _ in range(2 if guided else 1))
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  sample = _packed(sample_one, pack, (0, 0, None, 0))
  rows.append(plan.Program(
      "experts", "expert_sample", sample, (stacked, conds, rng, ids),
      params=per_device * unet_params, batch_per_device=per_device * count,
      info=dict(info, sampler=ec.sampler, guidance=ec.guidance,
                unet_batch=per_device * count * (2 if guided else 1))))
  return rows
