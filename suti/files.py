"""Small file helpers with no heavy imports (`suti.launch` uses them before jax is loaded)."""
from __future__ import annotations

import json
import pathlib


def write_json(path, value) -> None:
  """Writes `value` as JSON to a temp file and renames it over `path`: readers (and a stage
  deciding whether its summary marks it complete) see the old file or the new one, never half."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)
