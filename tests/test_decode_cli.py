"""scripts/decode.py: JSON output, batch == alone, and clear one-line errors for bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("decode_cli", os.path.join(ROOT, "scripts", "decode.py"))
decode_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_cli)


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
  pf = tmp_path / "p.jsonl"
  pf.write_text(json.dumps({"prompt": prompts[1]}) + "\n")
  code, _, err = run(args + ["--prompts-file", str(pf), "--output-json", str(tmp_path / "one.json")], capsys)
  assert code == 0, err
  alone = json.loads((tmp_path / "one.json").read_text())["results"][0]
  assert alone["output_ids"] == res["results"][1]["output_ids"]


def test_logit_margin_finds_where_two_runs_diverge(smollm2_ckpt, tmp_path, capsys):
  """scripts/logit_margin.py: replays run A's greedy tokens and reports, where run B first differs,
  the two tokens' logits; A being this machine's own greedy run, A's token must be the argmax."""
  spec = importlib.util.spec_from_file_location("logit_margin", os.path.join(ROOT, "scripts", "logit_margin.py"))
  lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lm)
  a = tmp_path / "a.json"
  code, _, err = run(["--checkpoint", str(smollm2_ckpt), "--max-new-tokens", "6", "--dtype", "float32", "--quiet",
                      "--prompt", "The capital of France is", "--prompt", "Hello", "--output-json", str(a)], capsys)
  assert code == 0, err
  assert lm.main([str(a), str(a)]) == 0 and "0 of 2 sequences differ" in capsys.readouterr().out
  obj = json.loads(a.read_text())
  obj["results"][1]["output_ids"][3] += 1  # run B: another token at output position 3
  b = tmp_path / "b.json"
  b.write_text(json.dumps(obj))
  out = tmp_path / "margins.json"
  assert lm.main([str(a), str(b), "--checkpoint", str(smollm2_ckpt), "--json", str(out)]) == 0
  [row] = json.loads(out.read_text())["divergences"]
  assert (row["sequence"], row["position"]) == (1, 3)
  assert row["this_machine_argmax"] == row["token_a"] and row["margin_a_minus_b"] > 0
  assert lm.main([str(a), str(tmp_path / "missing.json")]) == 2
  assert capsys.readouterr().err.startswith("error: cannot read decode.py output")


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "bad_dtype", "too_long", "empty_prompt",
                                  "no_prompt", "unreadable_file", "bad_jsonl", "bad_engine", "bad_tp"])
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
  }[case]
  (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
  code, out, err = run(argv + ["--max-new-tokens", "2"], capsys)
  assert code == 2
  lines = [ln for ln in err.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "decode.py"), "--checkpoint",
                      str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")
