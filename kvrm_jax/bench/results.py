"""Run metadata (device, versions, labels) and the raw JSON files of benchmark runs."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re

import flax
import jax

from kvrm_jax.cli import UserError, check_writable


def environment() -> dict:
  dev = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "backend": jax.default_backend(), "device": str(dev.device_kind), "device_count": jax.device_count(),
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
          "host": platform.machine(), "cpu_cores": os.cpu_count()}


def device_tag(env: dict) -> str:
  if env["backend"] == "cpu":
    return "cpu"
  m = re.search(r"([A-Z]\d{2,4}|MI\d+|v\d+[a-z]*)", env["device"])
  return (m.group(1) if m else re.sub(r"\W+", "-", env["device"])).lower()


def default_label(script: str, env: dict, model: str) -> str:
  return f"{script}-{device_tag(env)}-{model}"


def default_note(env: dict) -> str:
  return "smoke scale" if env["backend"] == "cpu" else ""


def check_outputs(*paths) -> None:
  """Before a run: each output file (None: not asked for) can be written, its folder created;
  a UserError now rather than a traceback after minutes of measuring."""
  for path in paths:
    if not path:
      continue
    folder = os.path.dirname(os.path.abspath(path))
    try:
      os.makedirs(folder, exist_ok=True)
    except FileExistsError:
      raise UserError(f"cannot write {path}: a part of {folder} is a file, not a folder") from None
    except OSError as e:
      raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    check_writable(path)


def write_json(path: str, obj: dict) -> None:
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=None, separators=(",", ":"))
  except OSError as e:
    raise UserError(f"cannot write {path}: {e}") from None


def read_json(path: str, kind: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}") from None
  if obj.get("kind") != kind:
    raise UserError(f"{path} holds {obj.get('kind')!r} results, not {kind!r}")
  return obj
