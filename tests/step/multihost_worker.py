"""One process of the 2-process (multi-controller) test in tests/step/test_sharding.py (CPU, or one GPU each).

  python tests/step/multihost_worker.py PROCESS_ID PORT OUT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
# On a machine with GPUs each process drives one of them (process i: GPU i), as one process per GPU
# would in production; on CPU this has no effect.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from flax import nnx  # noqa: E402

from kvrm_jax.config import ModelConfig, RuntimeConfig  # noqa: E402
from kvrm_jax.engine import Engine  # noqa: E402
from kvrm_jax.model.llama import Llama  # noqa: E402
from kvrm_jax.sched.request import SamplingParams  # noqa: E402
from kvrm_jax.step import sharding  # noqa: E402

cfg = ModelConfig.from_name("tiny")
rt = RuntimeConfig(block_size=8, num_blocks=64, max_slots=4, max_blocks_per_seq=16, prefill_buckets=(8, 32))
prompts = json.loads(os.environ["KVRM_TEST_PROMPTS"])
mesh = sharding.make_mesh("all")
eng = Engine(cfg, Llama(cfg, rngs=nnx.Rngs(0)), rt, mesh=mesh)
outs = eng.generate(prompts, SamplingParams(max_new_tokens=10))
with open(out, "w") as f:
  json.dump({"mesh": mesh.size, "processes": jax.process_count(), "outputs": [o.output_ids for o in outs]}, f)
