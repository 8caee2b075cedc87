"""Shared test fixtures. Tests run on CPU with one device; multi-device checks use subprocesses."""
import os
import pathlib
import tempfile

# One XLA compilation cache for the whole test session, subprocesses included: the same tiny
# train steps and samplers are compiled by several tests (set before jax is imported).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "suti-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), loaded by path as config_flags does."""
  from suti import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config_file(REPO / "configs" / f"{name}.py", arg)


@pytest.fixture
def tiny_config():
  return load_config("tiny")
