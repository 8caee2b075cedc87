"""Shared test fixtures. Tests run on CPU with one device; multi-device checks use subprocesses."""
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), loaded by path as config_flags does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def tiny_config():
  return load_config("tiny")
