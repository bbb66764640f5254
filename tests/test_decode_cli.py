"""scripts/decode.py: JSON output, batch == alone, and clear one-line errors for bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env, load_script

decode_cli = load_script("decode", "decode_cli")


def run(argv, capsys):
  code = decode_cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_json_output_and_batch_equals_alone(smollm2_ckpt, tmp_path, capsys):
  prompts = ["The capital of France is", "def add(a, b):", "Hello"]
  args = ["--checkpoint", str(smollm2_ckpt), "--max-new-tokens", "8", "--dtype", "float32", "--quiet"]
  code, out, err = run(args + sum((["--prompt", p] for p in prompts), []) +
                       ["--output-json", str(tmp_path / "all.json")], capsys)
  assert code == 0, err
  res = json.loads((tmp_path / "all.json").read_text())
  assert [r["prompt"] for r in res["results"]] == prompts
  for r in res["results"]:
    assert r["output_ids"] and len(r["output_ids"]) <= 8 and r["prompt_ids"]
  assert "Paris" in res["results"][0]["text"]
  st = res["stats"]
  for key in ("decode_compiles", "prefill_compiles", "steps", "reserved_kv_bytes", "live_kv_bytes", "preemptions",
              "prefix_hit_blocks", "mean_groups_per_seq", "host_us_per_step", "tokens_per_s"):
    assert key in st
  assert st["decode_compiles"] == 1
  assert st["greedy_only_steps"] is True  # temperature 0 (the default): steps without the sampling branch
  pf = tmp_path / "p.jsonl"
  pf.write_text(json.dumps({"prompt": prompts[1]}) + "\n")
  code, _, err = run(args + ["--prompts-file", str(pf), "--output-json", str(tmp_path / "one.json")], capsys)
  assert code == 0, err
  alone = json.loads((tmp_path / "one.json").read_text())["results"][0]
  assert alone["output_ids"] == res["results"][1]["output_ids"]


def test_sampled_decoding_keeps_the_sampling_steps_and_is_reproducible(smollm2_ckpt, tmp_path, capsys):
  """--temperature > 0 compiles the default steps (greedy-only ones would refuse the requests); a
  seed gives the same tokens twice."""
  args = ["--checkpoint", str(smollm2_ckpt), "--max-new-tokens", "6", "--dtype", "float32", "--quiet",
          "--prompt", "Once upon a time", "--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]
  outs = []
  for i in range(2):
    code, _, err = run(args + ["--output-json", str(tmp_path / f"s{i}.json")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / f"s{i}.json").read_text())
    assert res["stats"]["greedy_only_steps"] is False
    outs.append(res["results"][0]["output_ids"])
  assert len(outs[0]) == 6 and outs[0] == outs[1]


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "bad_dtype", "too_long", "empty_prompt",
                                  "no_prompt", "unreadable_file", "bad_jsonl", "bad_engine", "bad_tp", "skinny_on_cpu",
                                  "bad_step_tokens", "bad_tile_counts"])
def test_bad_input_is_one_clear_line(case, smollm2_ckpt, tmp_path, capsys):
  ck = ["--checkpoint", str(smollm2_ckpt)]
  argv = {
      "missing_ckpt": ["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"],
      "corrupt_ckpt": ["--checkpoint", str(tmp_path), "--prompt", "hi"],
      "bad_dtype": ck + ["--dtype", "float8", "--prompt", "hi"],
      "too_long": ck + ["--prompt", "word " * 9000],
      "empty_prompt": ck + ["--prompt", "  "],
      "no_prompt": ck,
      "unreadable_file": ck + ["--prompts-file", str(tmp_path / "missing.txt")],
      "bad_jsonl": ck + ["--prompts-file", str(tmp_path / "bad.jsonl")],
      "bad_engine": ck + ["--engine", "vllm", "--prompt", "hi"],
      "bad_tp": ck + ["--tp", "64", "--prompt", "hi"],
      "skinny_on_cpu": ck + ["--matmul", "skinny", "--prompt", "hi"],
      "bad_step_tokens": ck + ["--step-tokens", "fast", "--prompt", "hi"],
      "bad_tile_counts": ck + ["--step-tokens", "throughput", "--tile-counts", "8,4", "--prompt", "hi"],
  }[case]
  (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
  code, out, err = run(argv + ["--max-new-tokens", "2"], capsys)
  assert code == 2
  lines = [ln for ln in err.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  if case == "bad_tile_counts":
    assert "tile_counts must be strictly ascending" in err, err


def test_subprocess_error_has_no_traceback(tmp_path):
  env = child_env()
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "decode.py"), "--checkpoint",
                      str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")


def _damaged_copy(src, dst, damage):
  """A copy of checkpoint `src` whose files are symlinks, except the one `damage(dst)` rewrites."""
  shutil.copytree(src, dst, copy_function=os.symlink)
  damage(Path(dst))
  return dst


def _own(path: Path) -> Path:
  """Replace a symlink by a private copy of its target, to be modified."""
  target = path.resolve()
  path.unlink()
  shutil.copyfile(target, path)
  return path


def _largest_param_file(ck: Path) -> Path:
  return max((f for f in (ck / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _flip_middle(ck: Path):
  f = _own(_largest_param_file(ck))
  n = f.stat().st_size
  with open(f, "r+b") as h:  # 4 KiB in the middle: zstd chunks decode it to finite (wrong) weights
    h.seek(n // 2)
    data = h.read(4096)
    h.seek(n // 2)
    h.write(bytes(b ^ 0xFF for b in data))


def _truncate(ck: Path):
  f = _own(_largest_param_file(ck))
  os.truncate(f, f.stat().st_size // 3)


def _edit_config(**kw):
  def damage(ck: Path):
    cfg = json.loads(_own(ck / "kvrm_config.json").read_text())
    cfg.update(kw)
    (ck / "kvrm_config.json").write_text(json.dumps(cfg))
  return damage


def _garbage_tokenizer(ck: Path):
  _own(ck / "tokenizer.json").write_text("<html>not json</html>")


def _decode(argv, timeout=600, **kw):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "decode.py")] + argv, capture_output=True,
                        text=True, timeout=timeout, **kw)


BAD_CLI = {  # case: (argv after --checkpoint, damage of a checkpoint copy or None, words the error line holds)
    "block_size_0": (["--block-size", "0"], None, "--block-size must be >= 1"),
    "max_slots_0": (["--max-slots", "0"], None, "--max-slots must be >= 1"),
    "num_blocks_0": (["--num-blocks", "0"], None, "--num-blocks must be >= 1"),
    "temperature_nan": (["--temperature", "nan"], None, "temperature must be a finite number"),
    "temperature_inf": (["--temperature", "inf"], None, "temperature must be a finite number"),
    "top_k_huge": (["--top-k", "1000000"], None, "exceeds the vocabulary"),
    "output_json_unwritable": (["--output-json", "/no/such/dir/out.json"], None, "cannot write /no/such/dir"),
    "flipped_bytes": ([], _flip_middle, "is damaged"),
    "truncated_params": ([], _truncate, "is damaged"),
    "layer_mismatch": ([], _edit_config(num_layers=29), "implies"),
    "garbage_tokenizer": ([], _garbage_tokenizer, "tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_bad_cli_input_is_one_error_line_through_a_subprocess(case, smollm2_ckpt, tmp_path):
  """One `error:` line, exit 2, before any decoding (no phase line), no traceback (TensorStore dumps
  and orbax's "Event loop is closed" included); a damaged checkpoint's error names its folder."""
  argv, damage, words = BAD_CLI[case]
  ck = _damaged_copy(smollm2_ckpt, tmp_path / "ck", damage) if damage else smollm2_ckpt
  p = _decode(["--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "2"] + argv)
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
  assert words in lines[0], lines[0]
  assert not p.stdout.strip(), p.stdout  # nothing decoded: an unwritable output is found before, not after
  if damage:
    assert str(ck) in lines[0]


def test_unwritable_cache_folder_is_one_error_line(tmp_path):
  """The first conversion of the bundled model into a folder that cannot be created."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  p = _decode(["--cache-dir", str(blocker / "cache"), "--prompt", "hi", "--max-new-tokens", "2"])
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.splitlines()[-1].startswith(f"error: cannot write the converted model into the cache folder {blocker}")


def test_non_finite_weights_end_with_an_error_line(smollm2_ckpt, tmp_path):
  """NaN weights that pass the checksums (converted that way): an `error:` line and exit 2, never tokens."""
  import numpy as np
  import orbax.checkpoint as ocp

  from kvrm_jax.model import checkpoint as ckpt
  with ocp.StandardCheckpointer() as c:
    w = {k: np.asarray(v) for k, v in c.restore(smollm2_ckpt / "params").items()}
  w["final_norm"][:] = np.nan
  dst = ckpt.save_checkpoint(tmp_path / "nan", ckpt.read_config(smollm2_ckpt), w, ckpt.read_tokenizer(smollm2_ckpt))
  out = tmp_path / "out.json"
  p = _decode(["--checkpoint", str(dst), "--prompt", "hi", "--prompt", "Hello", "--max-new-tokens", "3",
               "--output-json", str(out)])
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.splitlines()[-1].startswith("error: 2 of 2 prompts (first: prompt 0) ended with an error"), p.stderr
  assert [r["output_ids"] for r in json.loads(out.read_text())["results"]] == [[], []]


def test_prompts_file_format_follows_its_extension(tmp_path):
  """A plain-text line that starts with `{` is a prompt; .jsonl files (or --prompts-format jsonl) are JSONL."""
  txt, jl = tmp_path / "p.txt", tmp_path / "p.jsonl"
  txt.write_text('{"prompt": "not JSON here"} is the text\n')
  jl.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n")
  for args, want in ((["--prompts-file", str(txt)], '{"prompt": "not JSON here"} is the text'),
                     (["--prompts-file", str(jl)], "The capital of France is"),
                     (["--prompts-file", str(txt), "--prompts-format", "text"], '{"prompt": "not JSON here"} is the text')):
    assert decode_cli.read_prompts(decode_cli.parse_args(args)) == [want]
  with pytest.raises(decode_cli.UserError, match=f"{re.escape(str(txt))}:1: invalid JSON"):
    decode_cli.read_prompts(decode_cli.parse_args(["--prompts-file", str(txt), "--prompts-format", "jsonl"]))


def test_jsonl_prompts_and_phase_lines_off_a_terminal(smollm2_ckpt, tmp_path):
  """End to end through a subprocess: a JSONL prompts file is decoded; loading and the first token
  each say what happened and how long it took, also in a log."""
  jl = tmp_path / "p.jsonl"
  jl.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n")
  p = _decode(["--checkpoint", str(smollm2_ckpt), "--prompts-file", str(jl), "--max-new-tokens", "2", "--quiet",
               "--output-json", str(tmp_path / "o.json")])
  assert p.returncode == 0, p.stderr
  assert [r["prompt"] for r in json.loads((tmp_path / "o.json").read_text())["results"]] == ["The capital of France is"]
  assert re.search(rf"^loading checkpoint {re.escape(str(smollm2_ckpt))} \.\.\. \d+\.\d s$", p.stderr, re.M), p.stderr
  assert re.search(r"^compiled the decode step in \d+\.\d s$", p.stderr, re.M), p.stderr
  assert re.search(r"^first token after \d+\.\d s", p.stderr, re.M), p.stderr


def test_damaged_checkpoint_without_checksums_is_a_warning_and_one_error_line(smollm2_ckpt, tmp_path):
  """A checkpoint from before checksums loads with a one-line warning; if damaged, orbax's failure is one
  `error:` line: no TensorStore spec dump, no "Event loop is closed" traceback from its threads."""
  def damage(ck):
    (ck / "checksums.json").unlink()
    _truncate(ck)
  ck = _damaged_copy(smollm2_ckpt, tmp_path / "ck", damage)
  p = _decode(["--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "2"])
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 2, p.stderr
  assert lines[0].startswith(f"warning: {ck} has no checksums.json")
  assert lines[1].startswith(f"error: cannot restore parameters from {ck}") and len(lines[1]) < 500, lines[1]


def test_cancelled_orbax_reads_are_not_logged(caplog):
  """asyncio's "never retrieved" records of orbax's cancelled array reads (each with TensorStore's
  spec: thousands of stderr lines when a GPU restore fails) are dropped; its other records are not."""
  import logging

  from kvrm_jax.model import checkpoint as ckpt
  ckpt._ignore_orphaned_read_callbacks()
  log = logging.getLogger("asyncio")
  orphan = Exception("Encountered error while reading array index: (slice(0, 30, 1),). See full TensorStore "
                     "details: <spec>.")
  with caplog.at_level(logging.ERROR):
    log.error("Task exception was never retrieved", exc_info=(Exception, orphan, None))
    log.error("Task exception was never retrieved", exc_info=(ValueError, ValueError("other"), None))
  assert [r.exc_info[1].args[0] for r in caplog.records if r.name == "asyncio"] == ["other"]


def test_api_damaged_checkpoint_is_a_value_error_naming_it(smollm2_ckpt, tmp_path):
  from kvrm_jax.config import RuntimeConfig
  from kvrm_jax.engine import Engine
  ck = _damaged_copy(smollm2_ckpt, tmp_path / "ck", _flip_middle)
  with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(ck))} is damaged: params/.* does not match"):
    Engine.from_checkpoint(ck, RuntimeConfig())


def test_bundled_cache_without_checksums_is_converted_again(smollm2_ckpt, tmp_path):
  """The bundled model's cache from before checksums is not trusted: it counts as not converted."""
  from kvrm_jax.model import checkpoint as ckpt
  dst, ready = ckpt.bundled_checkpoint_dir(tmp_path)
  assert not ready
  _damaged_copy(smollm2_ckpt, dst, lambda ck: None)
  assert ckpt.bundled_checkpoint_dir(tmp_path) == (dst, True)
  (dst / ckpt.CHECKSUM_FILE).unlink()
  assert ckpt.bundled_checkpoint_dir(tmp_path) == (dst, False)


def test_named_step_budgets_are_slots_plus_their_prompt_tokens():
  from kvrm_jax.cli import STEP_BUDGETS, UserError, step_tokens
  assert step_tokens("latency", 148) == 148 + STEP_BUDGETS["latency"] == 660
  assert step_tokens("throughput", 148) == 148 + STEP_BUDGETS["throughput"]
  assert step_tokens("0", 148) == 0 and step_tokens(" 300 ", 148) == 300
  with pytest.raises(UserError, match="--step-tokens must be an integer or one of throughput, latency"):
    step_tokens("fast", 148)
