"""The HF transformers side of the peer benchmark: importing transformers (one clear error when its
continuous batching is missing), the device, the attention implementation, the model."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import platform

from kvrm_jax import bench as bc


# ----------------------------------------------------------------------------- transformers


@dataclasses.dataclass
class HF:
  """The transformers pieces this script needs, found by feature detection (5.17 and later 5.x)."""

  torch: object
  transformers: object
  cb_config_cls: type
  cb_fields: frozenset
  size_field: str  # "block_size" (5.17) or "page_size" (later)
  hints_cls: object  # WorkloadHints, or None
  hard_stop: bool  # manager.stop(hard_stop=...) exists


def load_hf() -> HF:
  """Import torch and transformers; UserError if this transformers has no usable continuous batching.

  Imported here, not at the top: no import cycle, but optional dependencies (the `test` extra)
  whose absence or version this function turns into one clear error."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise bc.UserError(f"needs torch and transformers: {e}") from None
  v = transformers.__version__
  try:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import ContinuousBatchingManager
  except ImportError:
    raise bc.UserError(f"transformers {v} has no continuous batching (ContinuousBatchingConfig / "
                       "ContinuousBatchingManager); this script is written against 5.17+") from None
  fields = frozenset(f.name for f in dataclasses.fields(ContinuousBatchingConfig))
  add = set(inspect.signature(ContinuousBatchingManager.add_request).parameters)
  missing = [n for n in ("max_new_tokens", "record_timestamps", "eos_token_id", "request_id") if n not in add]
  missing += [n for n in ("num_blocks", "max_batch_tokens") if n not in fields]
  missing += [n for n in ("init_continuous_batching",) if not hasattr(transformers.LlamaForCausalLM, n)]
  size = "block_size" if "block_size" in fields and "page_size" not in fields else "page_size"
  if size not in fields:
    missing.append("page_size/block_size")
  if missing:
    raise bc.UserError(f"transformers {v}: the continuous batching API lacks {', '.join(missing)}")
  try:
    from transformers.generation.continuous_batching.utils import WorkloadHints
  except ImportError:
    WorkloadHints = None
  hard = "hard_stop" in inspect.signature(ContinuousBatchingManager.stop).parameters
  return HF(torch, transformers, ContinuousBatchingConfig, fields, size, WorkloadHints, hard)


def pick_device(hf: HF, text: str):
  torch = hf.torch
  if text == "auto":
    text = "cuda" if torch.cuda.is_available() else "cpu"
  try:
    dev = torch.device(text)
  except RuntimeError as e:
    raise bc.UserError(f"--device: {e}") from None
  if dev.type == "cuda" and not torch.cuda.is_available():
    raise bc.UserError("--device cuda, but torch sees no CUDA device")
  if dev.type not in ("cuda", "cpu"):
    raise bc.UserError(f"--device must be auto, cuda[:N] or cpu, got {text!r}")
  return dev


def attn_request(hf: HF, choice: str) -> tuple[str, dict]:
  """(attn_implementation for the model, extra ContinuousBatchingConfig fields) of --attn."""
  if choice == "sdpa":
    if "auto_switch_to_flash" in hf.cb_fields:  # later 5.x: plain sdpa is paged; keep HF from switching to flash
      return "sdpa", {"auto_switch_to_flash": False}
    return "paged|sdpa", {}  # 5.17: the paged| prefix is what keeps HF from switching to flash
  if choice == "eager":
    return "paged|eager", {}
  if choice == "auto":
    return "sdpa", {}
  return choice, {}


def hf_config(hf: HF, cfg):
  """A LlamaConfig of the preset's shape; EOS off (output lengths are forced)."""
  rope = dict(cfg.rope_scaling_dict) if cfg.rope_scaling else {"rope_type": "default"}
  rope["rope_theta"] = cfg.rope_theta
  return hf.transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, hidden_act="silu", attention_bias=False,
      mlp_bias=False, bos_token_id=cfg.bos_id, eos_token_id=None, pad_token_id=None)


def build_model(hf: HF, cfg, dtype: str, device, attn: str, seed: int):
  """LlamaForCausalLM built on `device` directly, then re-initialised: N(0, 0.02) matrices, unit norms."""
  torch = hf.torch
  with torch.device(device):
    try:
      model = hf.transformers.AutoModelForCausalLM.from_config(
          hf_config(hf, cfg), dtype=getattr(torch, dtype), attn_implementation=attn)
    except (ImportError, ValueError) as e:  # an attention implementation this install lacks
      raise bc.UserError(f"cannot build the model with attn_implementation={attn!r}: {one_line(e)}") from None
  model.to(device)  # a no-op where the device context was honoured
  gen = torch.Generator(device=device).manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.fill_(1.0)
      else:
        p.normal_(0.0, 0.02, generator=gen)
  return model.eval()


def one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def model_info(cfg, model, dtype: str) -> dict:
  n = sum(p.numel() for p in model.parameters())
  return {"name": cfg.name, "source": "random weights (transformers LlamaForCausalLM)", "dtype": dtype, "params": n,
          "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
          "layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "context": cfg.max_position}


def environment(hf: HF, device) -> dict:
  torch = hf.torch
  if device.type == "cuda":
    name, count = torch.cuda.get_device_name(device), torch.cuda.device_count()
  else:
    name, count = platform.processor() or platform.machine(), 1
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "backend": device.type, "device": name, "device_count": count, "torch": torch.__version__,
          "transformers": hf.transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
          "host": platform.machine(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
