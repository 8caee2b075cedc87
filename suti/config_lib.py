"""The experiment config: one schema shared by every config file, and its validation.

Config files in configs/ start from `base_config()` and override what differs, so every
experiment has the same keys and `--config.a.b=value` works for all of them. `validate()` runs
before any work starts and names the key and the bad value.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

# Every stage of the pipeline, in the order `suti.launch` runs them.
PIPELINE_ORDER = ("data", "clip", "pretrain", "plan", "experts", "apprentice", "evaluate",
                  "export")

SOURCES = ("world", "dreambench", "folder")
TEXT_ENCODERS = ("world", "clip", "t5")
OPTIMIZERS = ("adam", "adafactor")
LR_SCHEDULES = ("constant", "cosine")
SAMPLERS = ("ddpm", "ddim")
SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "x0", "v")
GUIDANCE_MODES = ("joint", "text_first", "image_first")  # apprentice: text and demo guidance


def load_config_file(path, arg=None) -> ml_collections.ConfigDict:
  """configs/<x>.py's get_config(arg), as `--config=configs/<x>.py:arg` loads it (for notebooks
  and scripts that do not go through absl flags). 'path:arg' is accepted too."""
  path = str(path)
  if arg is None and ":" in pathlib.Path(path).name:
    path, _, arg = path.rpartition(":")
  spec = importlib.util.spec_from_file_location(f"suti_config_{pathlib.Path(path).stem}", path)
  if spec is None or not pathlib.Path(path).is_file():
    raise ConfigError(f"config file {path} does not exist")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


class InputError(ValueError):
  """Bad user input (config, files, folders): `suti.launch` prints the message, exits 2."""


class ConfigError(InputError):
  """A config value is invalid; the message names the key and the value."""


def base_config() -> ml_collections.ConfigDict:
  """The full schema with small, CPU-sized defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # XLA compiles are cached here across runs (a CPU compile of a train step takes ~10 s);
  # empty disables. The env var JAX_COMPILATION_CACHE_DIR, when set, wins.
  c.compilation_cache_dir = "~/.cache/suti/jax"
  c.image_size = 32
  # Comma-separated stage names; `--stages` on the command line overrides it.
  c.stages = "data"

  # Devices: named mesh axes, sizes with -1 meaning "the rest". Code names axes, never counts.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.expert = -1   # experts stage: one expert (or a vmapped pack of them) per device
  c.mesh.data = -1     # pretrain / apprentice: data parallel
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False      # jax.distributed.initialize() on multi-host pods
  c.distributed.coordinator_address = ""  # empty: auto-detect (TPU VM metadata)
  c.distributed.num_processes = 0         # 0: auto-detect
  c.distributed.process_id = -1           # -1: auto-detect

  c.data = ml_collections.ConfigDict()
  c.data.source = "world"   # one of SOURCES
  c.data.path = ""          # folder for the dreambench / folder sources
  c.data.min_demos = 3      # subjects with fewer usable images are skipped
  c.data.max_demos = 10     # extra images of a subject are dropped (SuTI clusters: 3-10)
  c.data.unique_token = ""  # DreamBench prompt placeholder {0}; SuTI needs no identifier token
  c.data.folder_split = "train"  # split name the generic folder source is written to
  c.data.world = ml_collections.ConfigDict()
  c.data.world.seed = 0
  c.data.world.num_train_subjects = 64
  c.data.world.num_eval_subjects = 16
  # Held-out subjects from this index on: set it to a test run's num_eval_subjects to get a
  # validation set disjoint from the test subjects, for choosing settings without them.
  c.data.world.first_eval_subject = 0
  c.data.world.min_images = 3
  c.data.world.max_images = 6
  c.data.world.num_unseen_prompts = 4
  c.data.world.background_blur = 0.0  # output pixels; > 0 smooths scenes' texture (World)

  c.model = ml_collections.ConfigDict()
  c.model.channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = (8,)          # self-attention at these feature-map sizes
  c.model.cross_attention_resolutions = (16, 8)  # text cross-attention at these sizes
  c.model.num_heads = 4
  c.model.dropout = 0.0
  c.model.dtype = "float32"
  c.model.text_encoder = ml_collections.ConfigDict()
  c.model.text_encoder.kind = "world"  # one of TEXT_ENCODERS
  c.model.text_encoder.path = ""       # local Hugging Face directory for clip / t5
  c.model.text_encoder.max_length = 16
  c.model.text_encoder.width = 64
  c.model.text_encoder.num_layers = 2
  c.model.text_encoder.num_heads = 4
  # World encoder only: True keeps it at its initialisation (weights from a fixed key, so any
  # process rebuilds them), as Imagen freezes T5. Trained jointly, it pulls the categories'
  # prompts together (docs/RESULTS.md, issue 7). Pretrained kinds are always frozen.
  c.model.text_encoder.freeze = False

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.timesteps = 1000
  c.diffusion.prediction = "eps"
  c.diffusion.dynamic_threshold_percentile = 0.995

  # Scoring models. CLIP scores prompts (delta-CLIP filter, CLIP-T) and images (CLIP-I); the
  # DINO ViT scores subject identity (DINO). With `path` empty, stage `clip` trains small
  # world versions of both and saves them in the Hugging Face format the real ones use.
  c.clip = ml_collections.ConfigDict()
  c.clip.path = ""        # local HF CLIP directory (or hub name when online)
  c.clip.num_steps = 500
  c.clip.batch_size = 64
  c.clip.learning_rate = 1e-3
  c.clip.embed_dim = 64   # world CLIP: projection size
  c.clip.width = 64       # world CLIP: both towers' hidden size
  c.clip.num_layers = 2
  c.clip.num_heads = 4
  c.clip.patch_size = 4
  c.clip.max_length = 16
  # World CLIP: weight of an image-image term that makes its image embedding keep a subject's
  # looks across scenes, as real CLIP's does, so CLIP-I measures identity (clip_train).
  c.clip.identity_weight = 0.0
  c.dino = ml_collections.ConfigDict()
  c.dino.path = ""        # local HF ViT directory (e.g. DINO ViT-S/16)
  c.dino.num_steps = 500
  c.dino.batch_size = 64
  c.dino.learning_rate = 1e-3
  c.dino.width = 64
  c.dino.num_layers = 2
  c.dino.num_heads = 4
  c.dino.patch_size = 4

  c.pretrain = ml_collections.ConfigDict()
  # An existing base checkpoint (a path, or 'embedded:NAME' for one shipped in suti/assets/):
  # the pretrain stage then trains nothing.
  c.pretrain.base_checkpoint = ""
  c.pretrain.num_steps = 1000
  c.pretrain.batch_size = 16
  c.pretrain.optimizer = "adam"
  c.pretrain.learning_rate = 3e-4
  c.pretrain.warmup_steps = 100
  c.pretrain.lr_schedule = "constant"  # or 'cosine': decays to zero at num_steps
  c.pretrain.caption_dropout = 0.1
  # The embedded world only: this share of pre-training pairs are oracle renders of the whole
  # caption grammar (recolours, accessories, art styles), drawn from oracle_subjects of the
  # world's train split; the dataset's own captions name only a background.
  c.pretrain.oracle_fraction = 0.0
  c.pretrain.oracle_subjects = 4096
  c.pretrain.log_every = 50
  c.pretrain.sample_every = 500
  c.pretrain.checkpoint_every = 250
  # Sample grids of held-out prompts: the base model's guidance and sampler for them.
  c.pretrain.num_samples = 8
  c.pretrain.sample_sampler = "ddim"
  c.pretrain.sample_steps = 50
  c.pretrain.sample_guidance = 3.0

  c.experts = ml_collections.ConfigDict()
  c.experts.num_experts = 8         # K experts per round
  c.experts.experts_per_device = 0  # 0: ceil(K / devices), packed with vmap
  c.experts.num_steps = 100
  c.experts.batch_size = 4
  c.experts.optimizer = "adafactor"
  c.experts.learning_rate = 1e-4
  c.experts.sampler = "ddpm"
  c.experts.sample_steps = 100
  c.experts.guidance = 30.0
  c.experts.samples_per_prompt = 1
  c.experts.prompts_per_subject = 1      # unseen prompts sampled per expert
  c.experts.min_demos = 3                # subjects with fewer images are skipped (counted)
  c.experts.delta_clip_threshold = 0.02  # lambda, on raw cosine
  # None: the paper's filter (delta-CLIP only). A float: a sample is also admitted only if its
  # mean identity cosine to its own demos (the DINO-analogue, scoring's `dino`) is at least
  # this, so the apprentice learns from its teachers' faithful samples, not their misses
  # (RESULTS, issue 7). Needs a DINO model (dino.path, or the world's).
  c.experts.min_demo_identity = config_dict.placeholder(float)
  c.experts.num_rounds = 0               # 0: until the dataset is exhausted

  c.apprentice = ml_collections.ConfigDict()
  c.apprentice.num_steps = 1000
  c.apprentice.batch_size = 8
  c.apprentice.optimizer = "adafactor"
  c.apprentice.learning_rate = 1e-4
  c.apprentice.num_train_demos = 3
  c.apprentice.num_inference_demos = 4
  c.apprentice.guidance = 15.0
  c.apprentice.text_dropout = 0.1
  c.apprentice.demo_dropout = 0.1
  c.apprentice.finetune_steps = 0  # Dream-SuTI (paper: 500)
  c.apprentice.finetune_learning_rate = 1e-5
  c.apprentice.finetune_batch_size = 2
  # Re-Imagen: demo features enter through extra cross-attention at these feature-map sizes
  # (in the DownStack and the UpStack); demos are encoded clean, at this timestep.
  c.apprentice.demo_attention_resolutions = ()  # (): the UNet's lowest feature-map size
  c.apprentice.demo_timestep = 0
  # A feed-forward block of this width ratio after each demo attention (0: none); with 2 the
  # paper config's apprentice has ~430M new params (~2.55B in all), as SuTI's 2.5B.
  c.apprentice.demo_mlp_ratio = 2
  # Heads of the demo attentions (0: model.num_heads): their logits are [queries x demo tokens]
  # per head. At 1 head the demo's step took 0.30 s instead of 0.42, but its apprentice read its
  # demos less (demo gain DINO 0.11 against 0.20; RESULTS, issue 7).
  c.apprentice.demo_num_heads = 0
  # Fixed 2D sinusoids on the demo attention's queries and demo tokens (see suti/nn/unet.py):
  # lets it copy a demo cell to the same place in the target.
  c.apprentice.demo_positions = False
  c.apprentice.warmup_steps = 0
  c.apprentice.lr_schedule = "constant"  # or 'cosine': decays to zero at num_steps
  # Departures from the paper for small, short runs (defaults: the paper's recipe). Knowing the
  # subject mostly helps at high noise, where the plain eps loss is tiny, so the demo layers'
  # gradient drowns in low-noise detail (RESULTS, issue 7):
  # - this fraction of each batch draws t from [high_noise_from * T, T) instead of [0, T);
  # - each example's loss is weighted min(1 / alpha_bar_t, loss_weight_cap) (1: w_t = 1;
  #   uncapped it is the v-prediction loss);
  # - freeze_base trains only the new demo layers (as Flamingo freezes its language model),
  #   so noisy pseudo-targets cannot degrade the base's drawing.
  c.apprentice.high_noise_fraction = 0.0
  c.apprentice.high_noise_from = 0.5
  c.apprentice.loss_weight_cap = 1.0
  c.apprentice.freeze_base = False
  # The base's params' own learning rate when they train (freeze_base False); None: as the
  # new layers' learning_rate.
  c.apprentice.base_learning_rate = config_dict.placeholder(float)
  # Generation: DDPM as in the paper. guidance_mode 'joint' guides text and demos together
  # with `guidance`; 'text_first' / 'image_first' guide them separately (JeDi's image
  # guidance) with text_guidance and demo_guidance.
  c.apprentice.sampler = "ddpm"
  c.apprentice.sample_steps = 100
  c.apprentice.guidance_mode = "joint"
  c.apprentice.text_guidance = 7.5
  c.apprentice.demo_guidance = 3.0
  # Training reads the experts' buffer as it grows: it waits this long for enough admitted
  # records, and sees newly committed rounds at each pass over the buffer.
  c.apprentice.buffer_wait_s = 0.0
  # None: the experts' verdicts; a float: lambda re-applied to every scored sample (any sign:
  # the world CLIP's lambda is negative).
  c.apprentice.delta_clip_threshold = config_dict.placeholder(float)
  c.apprentice.log_every = 10
  c.apprentice.checkpoint_every = 100
  c.apprentice.sample_every = 500
  c.apprentice.num_sample_subjects = 4  # held-out subjects in the sample grids

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_subjects = 8
  c.evaluate.images_per_prompt = 1
  c.evaluate.prompts_per_subject = 0  # 0: all of each subject's prompts
  c.evaluate.methods = "base,experts,suti,suti_other_demos,dream_suti,oracle"
  c.evaluate.sampler = "ddpm"         # every method samples the same way
  c.evaluate.sample_steps = 100
  c.evaluate.max_demos = 5            # SuTI's curve over 1..max_demos demos (0: none)

  # Stage `plan`: AOT compile of every stage's steps with abstract shapes, nothing allocated.
  c.plan = ml_collections.ConfigDict()
  c.plan.num_devices = 0          # 0: all devices of the target
  c.plan.device_memory_gib = 0.0  # 0: the target's (this machine's RAM on CPU; TPU v4: 32)
  c.plan.target = ""              # "": this machine; "tpu:v4:2x2x1" needs libtpu installed
  c.plan.compile = True           # False: lower only (FLOPs, no memory figures)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = False
  return c


def lookup(config, dotted: str):
  """config['a']['b'] for 'a.b' (a ConfigDict or the plain dicts of a saved config.json)."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _positive_ints(config, keys, allow_zero=()):
  for key in keys:
    value = lookup(config, key)
    floor = 0 if key in allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < floor:
      relation = ">= 0" if floor == 0 else "> 0"
      raise ConfigError(f"{key} must be an integer {relation}, got {value!r}")


def _choice(config, key, choices):
  value = lookup(config, key)
  if value not in choices:
    raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def parse_stages(stages: str | tuple | list) -> list[str]:
  """'data, pretrain' -> ['data', 'pretrain'], in the order given, each name checked."""
  if isinstance(stages, str):
    names = [s.strip() for s in stages.split(",") if s.strip()]
  else:
    names = list(stages)
  if not names:
    raise ConfigError("stages must name at least one stage, got an empty list")
  for name in names:
    if name not in PIPELINE_ORDER:
      raise ConfigError(f"stages: unknown stage {name!r}; known stages: "
                        f"{', '.join(PIPELINE_ORDER)}")
  return names


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every value a stage relies on; raises ConfigError naming the key and value."""
  parse_stages(config.stages)
  _positive_ints(config, [
      "image_size", "data.min_demos", "data.max_demos", "data.world.num_train_subjects",
      "data.world.num_eval_subjects", "data.world.min_images", "data.world.max_images",
      "data.world.num_unseen_prompts", "model.channels", "model.num_res_blocks",
      "model.num_heads", "model.text_encoder.max_length", "model.text_encoder.width",
      "model.text_encoder.num_layers", "model.text_encoder.num_heads", "diffusion.timesteps",
      "clip.num_steps", "clip.batch_size", "clip.embed_dim", "clip.width", "clip.num_layers",
      "clip.num_heads", "clip.patch_size", "clip.max_length", "dino.num_steps",
      "dino.batch_size", "dino.width", "dino.num_layers", "dino.num_heads", "dino.patch_size",
      "pretrain.num_steps", "pretrain.batch_size", "pretrain.oracle_subjects",
      "pretrain.log_every", "pretrain.sample_every", "pretrain.checkpoint_every",
      "experts.num_experts", "experts.experts_per_device", "experts.num_steps",
      "experts.batch_size", "experts.sample_steps", "experts.samples_per_prompt",
      "experts.prompts_per_subject", "experts.min_demos",
      "experts.num_rounds", "apprentice.num_steps", "apprentice.batch_size",
      "apprentice.num_train_demos", "apprentice.num_inference_demos",
      "apprentice.finetune_steps", "evaluate.num_subjects", "evaluate.images_per_prompt",
      "checkpoint.max_to_keep", "pretrain.warmup_steps", "pretrain.num_samples",
      "pretrain.sample_steps", "apprentice.finetune_batch_size", "apprentice.warmup_steps",
      "apprentice.sample_steps", "apprentice.log_every", "apprentice.checkpoint_every",
      "apprentice.sample_every", "apprentice.num_sample_subjects", "apprentice.demo_mlp_ratio",
      "apprentice.demo_num_heads",
      "evaluate.prompts_per_subject", "evaluate.sample_steps", "evaluate.max_demos",
      "data.world.first_eval_subject",
  ], allow_zero=("evaluate.prompts_per_subject", "evaluate.max_demos",
                 "data.world.first_eval_subject", "apprentice.demo_mlp_ratio",
                 "apprentice.demo_num_heads", "experts.experts_per_device", "experts.num_rounds",
                 "apprentice.finetune_steps", "pretrain.warmup_steps",
                 "apprentice.warmup_steps", "apprentice.num_sample_subjects"))
  _choice(config, "data.source", SOURCES)
  _choice(config, "model.text_encoder.kind", TEXT_ENCODERS)
  _choice(config, "pretrain.optimizer", OPTIMIZERS)
  _choice(config, "pretrain.lr_schedule", LR_SCHEDULES)
  _choice(config, "apprentice.lr_schedule", LR_SCHEDULES)
  _choice(config, "experts.optimizer", OPTIMIZERS)
  _choice(config, "apprentice.optimizer", OPTIMIZERS)
  _choice(config, "experts.sampler", SAMPLERS)
  _choice(config, "apprentice.sampler", SAMPLERS)
  _choice(config, "evaluate.sampler", SAMPLERS)
  _choice(config, "apprentice.guidance_mode", GUIDANCE_MODES)
  _choice(config, "pretrain.sample_sampler", SAMPLERS)
  _choice(config, "diffusion.schedule", SCHEDULES)
  _choice(config, "diffusion.prediction", PREDICTIONS)

  if config.data.source in ("dreambench", "folder") and not config.data.path:
    raise ConfigError(f"data.path must name a folder when data.source={config.data.source!r}")
  if config.data.min_demos > config.data.max_demos:
    raise ConfigError(f"data.min_demos ({config.data.min_demos}) must be <= data.max_demos "
                      f"({config.data.max_demos})")
  world = config.data.world
  blur = world.background_blur
  if (isinstance(blur, bool) or not isinstance(blur, (int, float))
      or not 0 <= blur <= config.image_size / 4):
    raise ConfigError(f"data.world.background_blur must be a number of pixels in [0, "
                      f"image_size / 4 = {config.image_size / 4:g}], got {blur!r}")
  if world.min_images > world.max_images:
    raise ConfigError(f"data.world.min_images ({world.min_images}) must be <= "
                      f"data.world.max_images ({world.max_images})")

  mult = tuple(config.model.channel_mult)
  if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
    raise ConfigError(f"model.channel_mult must be a non-empty tuple of positive integers, "
                      f"got {mult!r}")
  downsample = 2 ** (len(mult) - 1)
  if config.image_size % downsample:
    raise ConfigError(f"image_size must be divisible by the UNet's downsampling factor "
                      f"{downsample} (2**(len(model.channel_mult)-1)), got {config.image_size}")
  sizes = {config.image_size // 2**i for i in range(len(mult))}
  for key in ("model.attention_resolutions", "model.cross_attention_resolutions",
              "apprentice.demo_attention_resolutions"):
    for res in lookup(config, key):
      if res not in sizes:
        raise ConfigError(f"{key} has {res}, which is not one of the UNet's feature-map sizes "
                          f"{sorted(sizes, reverse=True)}")
  if config.model.channels % config.model.num_heads:
    raise ConfigError(f"model.channels ({config.model.channels}) must be divisible by "
                      f"model.num_heads ({config.model.num_heads})")
  if config.model.channels % (config.apprentice.demo_num_heads or 1):
    raise ConfigError(f"model.channels ({config.model.channels}) must be divisible by "
                      f"apprentice.demo_num_heads ({config.apprentice.demo_num_heads})")
  if not 0.0 <= config.model.dropout < 1.0:
    raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")

  for key in ("pretrain.learning_rate", "experts.learning_rate", "apprentice.learning_rate",
              "apprentice.finetune_learning_rate",
              "clip.learning_rate", "dino.learning_rate"):
    if not lookup(config, key) > 0:
      raise ConfigError(f"{key} must be > 0, got {lookup(config, key)!r}")
  base_lr = config.apprentice.base_learning_rate
  if base_lr is not None and not base_lr >= 0:
    raise ConfigError(f"apprentice.base_learning_rate must be >= 0 (or unset), got {base_lr!r}")
  if base_lr is not None and config.apprentice.freeze_base:
    raise ConfigError("apprentice.base_learning_rate is set but apprentice.freeze_base is "
                      "True: a frozen base does not train; unset one of them")
  min_identity = config.experts.min_demo_identity
  if min_identity is not None and not -1 <= min_identity <= 1:
    raise ConfigError(f"experts.min_demo_identity is a cosine, so must be in [-1, 1] (or "
                      f"unset), got {min_identity!r}")
  if not config.clip.identity_weight >= 0:
    raise ConfigError(f"clip.identity_weight must be >= 0, got {config.clip.identity_weight!r}")
  if not 0.0 <= config.pretrain.oracle_fraction <= 1.0:
    raise ConfigError(f"pretrain.oracle_fraction must be in [0, 1], got "
                      f"{config.pretrain.oracle_fraction!r}")
  if config.pretrain.oracle_fraction and config.data.source != "world":
    raise ConfigError(f"pretrain.oracle_fraction is {config.pretrain.oracle_fraction} but "
                      f"data.source is {config.data.source!r}: only the embedded world has an "
                      f"oracle; set it to 0")
  for key in ("pretrain.caption_dropout", "apprentice.text_dropout", "apprentice.demo_dropout"):
    if not 0.0 <= lookup(config, key) < 1.0:
      raise ConfigError(f"{key} must be in [0, 1), got {lookup(config, key)!r}")
  for key in ("experts.guidance", "apprentice.guidance", "pretrain.sample_guidance",
              "apprentice.text_guidance", "apprentice.demo_guidance", "apprentice.buffer_wait_s"):
    if lookup(config, key) < 0:
      raise ConfigError(f"{key} must be >= 0, got {lookup(config, key)!r}")
  if not 0.5 < config.diffusion.dynamic_threshold_percentile <= 1.0:
    raise ConfigError(f"diffusion.dynamic_threshold_percentile must be in (0.5, 1], got "
                      f"{config.diffusion.dynamic_threshold_percentile}")
  if not 0 <= config.apprentice.demo_timestep < config.diffusion.timesteps:
    raise ConfigError(f"apprentice.demo_timestep must be in [0, diffusion.timesteps), got "
                      f"{config.apprentice.demo_timestep!r}")
  if not 0.0 <= config.apprentice.high_noise_fraction <= 1.0:
    raise ConfigError(f"apprentice.high_noise_fraction must be in [0, 1], got "
                      f"{config.apprentice.high_noise_fraction!r}")
  if not 0.0 <= config.apprentice.high_noise_from < 1.0:
    raise ConfigError(f"apprentice.high_noise_from must be in [0, 1), got "
                      f"{config.apprentice.high_noise_from!r}")
  if not config.apprentice.loss_weight_cap >= 1.0:
    raise ConfigError(f"apprentice.loss_weight_cap must be >= 1 (1: the plain loss), got "
                      f"{config.apprentice.loss_weight_cap!r}")
  if config.apprentice.num_train_demos > config.data.min_demos:
    raise ConfigError(f"apprentice.num_train_demos ({config.apprentice.num_train_demos}) must "
                      f"be <= data.min_demos ({config.data.min_demos}): every subject must "
                      f"have that many demonstrations")

  for name in ("clip", "dino"):
    if config.image_size % config[name].patch_size:
      raise ConfigError(f"image_size ({config.image_size}) must be divisible by "
                        f"{name}.patch_size ({config[name].patch_size})")
    if config[name].width % config[name].num_heads:
      raise ConfigError(f"{name}.width ({config[name].width}) must be divisible by "
                        f"{name}.num_heads ({config[name].num_heads})")

  if isinstance(config.plan.num_devices, bool) or not isinstance(config.plan.num_devices, int) \
      or config.plan.num_devices < 0:
    raise ConfigError(f"plan.num_devices must be an integer >= 0, got {config.plan.num_devices!r}")
  if config.plan.device_memory_gib < 0:
    raise ConfigError(f"plan.device_memory_gib must be >= 0, got {config.plan.device_memory_gib}")
  if config.plan.target and not config.plan.target.startswith("tpu:"):
    raise ConfigError(f"plan.target must be empty or 'tpu:<version>:<topology>', got "
                      f"{config.plan.target!r}")

  for axis in ("expert", "data"):
    size = config.mesh[axis]
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis} must be a positive integer or -1 (all devices), "
                        f"got {size!r}")
  return config
