"""Tensor parallelism over 2 forced host devices: tp=2 decodes exactly what tp=1 does."""

import dataclasses
import json
import os

import jax
import pytest
from flax import nnx

from conftest import ROOT, TINY, child_env, load_script, needs_devices, random_prompts

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.step import sharding

pytestmark = pytest.mark.skipif(bool(needs_devices(2)), reason=str(needs_devices(2)))

ODD = dataclasses.replace(TINY, name="odd", num_heads=9, num_kv_heads=3, intermediate_size=130)
RT = RuntimeConfig(block_size=8, num_blocks=64, max_slots=4, max_blocks_per_seq=16, prefill_buckets=(8, 32))


def _prompts():
  return random_prompts(0, (5, 17, 40, 3, 26), vocab=256)


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["divisible", "padded-heads"])
def test_tp2_equals_tp1(cfg):
  model = Llama(cfg, rngs=nnx.Rngs(0))
  outs = {}
  for tp in (1, 2):
    eng = Engine(cfg, model, RT, mesh=sharding.make_mesh(tp))
    outs[tp] = [o.output_ids for o in eng.generate(_prompts(), SamplingParams(max_new_tokens=10))]
    assert eng.compiles.decode == 1
  assert outs[1] == outs[2]


def test_params_and_pool_are_sharded_and_step_has_collectives():
  eng = Engine(ODD, Llama(ODD, rngs=nnx.Rngs(0)), RT, mesh=sharding.make_mesh(2))
  assert eng.cfg.num_kv_heads == 4 and eng.cfg.num_heads == 12  # inert padding heads
  assert eng.k_pool.sharding.spec == sharding.POOL_SPEC
  assert len(eng.k_pool.addressable_shards) == 2
  assert eng.k_pool.addressable_shards[0].data.shape[0] == 2  # 2 of the 4 KV heads per device
  wqkv = eng.state["wqkv"][...]
  assert wqkv.sharding.spec == sharding.COL and wqkv.addressable_shards[0].data.shape[-1] == wqkv.shape[-1] // 2
  assert eng.state["w_down"][...].sharding.spec == sharding.ROW
  ints, floats = eng.dlayout.pack(eng.dlayout.new())
  hlo = eng.decode_step.lower(eng.state, eng.k_pool, eng.v_pool, ints, floats).compile().as_text()
  assert "all-reduce" in hlo


def test_tp_larger_than_devices_is_refused():
  with pytest.raises(sharding.ShardingError, match="devices"):
    sharding.make_mesh(len(jax.devices()) + 1)
  with pytest.raises(sharding.ShardingError):
    sharding.make_mesh("two")


def test_decode_cli_tp2_on_smollm2(smollm2_ckpt, tmp_path, capsys):
  """The real checkpoint (9 q / 3 kv heads, padded to 4 kv heads at tp=2), mixed-length batch."""
  cli = load_script("decode", "decode_cli_tp")
  res = {}
  for tp in ("1", "2"):
    out = tmp_path / f"tp{tp}.json"
    code = cli.main(["--checkpoint", str(smollm2_ckpt), "--tp", tp, "--dtype", "float32", "--max-new-tokens", "12",
                     "--quiet", "--prompt", "The capital of France is", "--prompt",
                     "A long time ago, in a galaxy far, far away, there lived a", "--output-json", str(out)])
    assert code == 0, capsys.readouterr().err
    res[tp] = [r["output_ids"] for r in json.loads(out.read_text())["results"]]
  assert res["1"] == res["2"]


def test_two_processes_multi_controller_equals_one(tmp_path):
  """The same mesh code spanning 2 processes (jax.distributed over loopback; one device each: gloo
  collectives on CPU, NCCL where each process drives one GPU) decodes what one process does at tp=1."""
  import socket
  import subprocess
  import sys
  prompts = _prompts()[:3]
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
  env = child_env(KVRM_TEST_PROMPTS=json.dumps(prompts))
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "step", "multihost_worker.py"), str(i), port,
                             str(tmp_path / f"p{i}.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
  assert all(r["mesh"] == 2 and r["processes"] == 2 for r in res)
  single = Engine(TINY, Llama(TINY, rngs=nnx.Rngs(0)), RT, mesh=sharding.make_mesh(1))
  expected = [o.output_ids for o in single.generate(prompts, SamplingParams(max_new_tokens=10))]
  assert res[0]["outputs"] == res[1]["outputs"] == expected
