"""Shared test fixtures. Tests run on CPU with one device; multi-device checks use subprocesses."""
import os
import pathlib
import tempfile

# One XLA compilation cache for the whole test session, subprocesses included: the same tiny
# train steps and samplers are compiled by several tests (set before jax is imported).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "suti-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite is compile-bound (tiny programs, a few steps each): LLVM at -O0 compiles them
# about a third faster, and at -O0 XLA:CPU's older loop emitters a fifth faster again than its
# fusion emitters (tiny's steps and samplers: 46 -> 36 s, half the peak memory; at the default
# -O they are slower, so only the suite uses them). Subprocesses inherit it (device_flags).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# XLA:CPU's per-step buffers on huge pages, as `python -m suti.launch` runs (suti/hostmem.py).
# glibc reads it when a process starts: the xdist workers and the subprocesses get it.
from suti import hostmem  # pylint: disable=wrong-import-position
_HUGE_PAGES = hostmem.huge_pages_environ(os.environ)
if _HUGE_PAGES:
  os.environ["GLIBC_TUNABLES"] = _HUGE_PAGES["GLIBC_TUNABLES"]

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# tiny's UNet is one level (compile time grows with a program's op count); the network's own
# tests put it on two, with self-attention at the lower one (config.model.update(...)).
TWO_LEVEL = {"channel_mult": (1, 2), "attention_resolutions": (8,),
             "cross_attention_resolutions": (8,)}


def device_flags(devices: int) -> str:
  """XLA_FLAGS for a child Python with `devices` fake CPU devices (and the suite's flags)."""
  return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), loaded by path as config_flags does."""
  from suti import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config_file(REPO / "configs" / f"{name}.py", arg)


@pytest.fixture
def tiny_config():
  return load_config("tiny")
