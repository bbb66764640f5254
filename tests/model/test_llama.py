"""The model and checkpoints against HF transformers (the independent reference)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import checkpoint as ckpt
from kvrm_jax.model import reference
from kvrm_jax.model.llama import checkpoint_shapes, checkpoint_weights, fuse_weights, unfuse_weights
from kvrm_jax.sched.request import SamplingParams

torch = pytest.importorskip("torch", reason="the reference stack (pip install -e '.[test]') is not installed")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Water boils at",
    "List three primary colors:",
    "The quick brown fox",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Translate to French: Good morning, how are you?",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
  m = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32)
  return m.eval()


@pytest.fixture(scope="module")
def ours(smollm2_ckpt):
  return ckpt.load_checkpoint(smollm2_ckpt, "float32")


def test_bundled_config(ours):
  cfg, _, tok = ours
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
  assert cfg.tie_embeddings and cfg.eos_ids == (2,) and tok.vocab_size == cfg.vocab_size == 49152


def test_prefill_logits_match_hf(ours, hf_model):
  cfg, model, tok = ours
  for text in PROMPTS[:3]:
    ids = tok.encode(text)
    with torch.no_grad():
      ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    got = reference.forward_logits(model, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, (text, rel)


@pytest.fixture(scope="module")
def hf_greedy(ours, hf_model):
  """The 8 prompts' token ids and HF `generate`'s 32 greedy tokens for each."""
  cfg, _, tok = ours
  ids = [tok.encode(p) for p in PROMPTS]
  expected = []
  for x in ids:
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([x]), max_new_tokens=32, do_sample=False, eos_token_id=list(cfg.eos_ids),
                              pad_token_id=tok.pad_id)
    expected.append(out[0, len(x):].tolist())
  return ids, expected


# One test per engine layout, so the runs (mostly compiles on a GPU) spread over the test workers.
@pytest.mark.parametrize("kind,step_tokens", [("kvrm", 0), ("kvrm", 4 + 2 * 8), ("static", 0)],
                         ids=["kvrm", "kvrm-mixed", "static"])
def test_engine_greedy_matches_hf_generate(ours, hf_greedy, kind, step_tokens):
  """8 varied prompts x 32 new tokens, decoded together (mixed lengths) by both engines, the KV-RM
  engine with separate prefill calls and with mixed steps (prompts split over steps, in tiles of 8)."""
  cfg, model, tok = ours
  ids, expected = hf_greedy
  r = RuntimeConfig(block_size=16, num_blocks=64, max_slots=4, max_blocks_per_seq=4, prefill_buckets=(16, 32),
                    step_tokens=step_tokens, tile=8)
  eng = Engine(cfg, model, r, tokenizer=tok, kind=kind)
  outs = eng.generate(ids, SamplingParams(max_new_tokens=32))
  for o, e, p in zip(outs, expected, PROMPTS):
    assert o.output_ids == e, (kind, step_tokens, p, tok.decode(o.output_ids), tok.decode(e))
  assert (eng.stats.mixed_steps > 0) == (step_tokens > 0)


def test_hf_folder_import_with_llama3_rope(tmp_path):
  hf_cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=512, rope_theta=50000.0, tie_word_embeddings=False,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64})
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ckpt.convert(str(tmp_path / "hf"), tmp_path / "ours", progress=False)
  cfg, model, tok = ckpt.load_checkpoint(tmp_path / "ours", "float32")
  assert tok is None and cfg.rope_scaling_dict["rope_type"] == "llama3" and not cfg.tie_embeddings
  ids = list(np.random.default_rng(0).integers(0, 300, 200))  # past original_max_position_embeddings
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits[0].numpy()
  got = reference.forward_logits(model, ids)
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_checkpoint_roundtrip_and_dtype(tmp_path):
  from flax import nnx

  from kvrm_jax.model.llama import Llama
  cfg = ModelConfig.from_name("tiny")
  m = Llama(cfg, rngs=nnx.Rngs(3))
  weights = {k: np.asarray(v) for k, v in checkpoint_weights(m).items()}
  assert set(weights) == set(checkpoint_shapes(cfg))  # the checkpoint holds the separate matrices
  ckpt.save_checkpoint(tmp_path / "c", cfg, weights)
  cfg2, m2, _ = ckpt.load_checkpoint(tmp_path / "c", "bfloat16")
  assert cfg2 == cfg and m2.wqkv[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(m2.wqkv[...], np.float32), np.asarray(m.wqkv[...]), rtol=1e-2, atol=1e-2)
  back = checkpoint_weights(m2)
  for k in ("wq", "wk", "wv", "w_gate", "w_up"):
    np.testing.assert_allclose(np.asarray(back[k], np.float32), weights[k], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tp_kv", [(1, 3), (2, 4)])
def test_fused_projections_match_separate(tp_kv):
  """The fused wqkv / w_gate_up layer gives the separate-matrix layer's q, k, v and MLP output, and
  column-sharding the fused matrices gives each of tp shards exactly its own heads and features."""
  import dataclasses
  tp, kh = tp_kv
  cfg = dataclasses.replace(ModelConfig.from_name("tiny"), num_kv_heads=kh, num_heads=3 * kh)
  rng = np.random.default_rng(0)
  w = {k: rng.standard_normal(s).astype(np.float32) for k, s in checkpoint_shapes(cfg).items()}
  fused = fuse_weights(cfg, w)
  back = unfuse_weights(cfg, fused)
  for k in w:
    np.testing.assert_array_equal(back[k], w[k])
  L, d, e, g, f = cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.q_per_kv, cfg.intermediate_size
  x = rng.standard_normal((5, d)).astype(np.float32)
  for s in range(tp):  # shard s of the fused columns == the fused form of shard s's own heads
    cols = lambda a, n: np.split(a, tp, axis=-1)[s]  # noqa: E731
    qkv = (x @ cols(fused["wqkv"][0], tp)).reshape(5, kh // tp, g + 2, e)
    q_ref = (x @ cols(w["wq"][0], tp)).reshape(5, kh // tp, g, e)
    np.testing.assert_allclose(qkv[:, :, :g], q_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, g], (x @ cols(w["wk"][0], tp)).reshape(5, kh // tp, e), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, g + 1], (x @ cols(w["wv"][0], tp)).reshape(5, kh // tp, e),
                               rtol=1e-5, atol=1e-5)
    gu = (x @ cols(fused["w_gate_up"][0], tp)).reshape(5, f // tp, 2)
    np.testing.assert_allclose(gu[..., 0], x @ cols(w["w_gate"][0], tp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gu[..., 1], x @ cols(w["w_up"][0], tp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_model_draws_the_eager_weights(dtype):
  """random_model (one compiled draw, what the presets' servers and benchmarks use) gives the weights
  of the eager constructor in the model's dtype: bit for bit in bfloat16; in float32 within one
  rounding (XLA fuses the draw with its scale, and the fused code can round the last bit otherwise;
  with an optimization barrier between them the values are equal). Another seed gives other weights."""
  import jax
  from flax import nnx
  from kvrm_jax.model.llama import Llama, random_model
  cfg = ModelConfig.from_name("tiny")
  eager = nnx.to_pure_dict(nnx.state(Llama(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))
  drawn = nnx.to_pure_dict(nnx.state(random_model(cfg, jnp.dtype(dtype))))
  assert jax.tree.structure(drawn) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(eager)):
    assert a.dtype == b.dtype == jnp.dtype(dtype)
    if dtype == "bfloat16":
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2.5e-7, atol=0)
  other = nnx.state(random_model(cfg, jnp.dtype(dtype), seed=1))
  assert not np.array_equal(np.asarray(other["wqkv"][...], np.float32), np.asarray(eager["wqkv"], np.float32))


@pytest.mark.parametrize("with_summaries", [False, True])
def test_layer_loop_unroll_matches_scan(with_summaries):
  """RuntimeConfig.layer_loop="unroll" (static per-layer weight slices) gives the scan's logits (bit for
  bit on CPU) through the engine's prefill and decode steps (float32, tiny model, reference attention)."""
  import dataclasses

  from flax import nnx

  from kvrm_jax.model.llama import Llama
  from kvrm_jax.sched.summaries import SummaryConfig
  cfg = ModelConfig.from_name("tiny")
  model = Llama(cfg, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(5)
  ps = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 19, 40)]
  sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
  sc = SummaryConfig.parse("sink=1,window=16,max=2") if with_summaries else None
  rt = RuntimeConfig(block_size=8, num_blocks=64, max_slots=4, max_blocks_per_seq=16, max_groups=2,
                     prefill_buckets=(8, 32), attention="reference", max_summaries=2 if with_summaries else 0)
  logits, toks = {}, {}
  for loop in ("scan", "unroll"):
    eng = Engine(cfg, model, dataclasses.replace(rt, layer_loop=loop), with_logits=True, summaries=sc)
    rids = [eng.add_request(p, sp) for p in ps]
    rows = []
    while eng.has_work():
      eng.step()
      rows.append(np.stack([eng.last_logits.get(r, np.zeros(cfg.vocab_size, np.float32)) for r in rids]))
    logits[loop], toks[loop] = np.stack(rows), [eng.requests[r].output_ids for r in rids]
    assert eng.compiles.decode == 1 and (eng.stats.folds > 0) == with_summaries
  assert toks["unroll"] == toks["scan"]
  import jax
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(logits["unroll"], logits["scan"])
  else:  # GPU: both exact float32, but XLA fuses unrolled and scanned layers differently, so sums round
    # in another order: at most 1.2e-6 apart on an H200 (about 10 ulp of logits near 1); 1e-5 bounds that.
    np.testing.assert_allclose(logits["unroll"], logits["scan"], rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="layer_loop"):
    RuntimeConfig(layer_loop="while")


@pytest.mark.parametrize("bad", ["missing", "empty_dir", "corrupt_config", "corrupt_params"])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, bad):
  path = tmp_path / "c"
  if bad != "missing":
    path.mkdir()
  if bad == "corrupt_config":
    (path / ckpt.CONFIG_FILE).write_text("{not json")
    (path / ckpt.PARAMS_DIR).mkdir()
  if bad == "corrupt_params":
    (path / ckpt.CONFIG_FILE).write_text(ModelConfig.from_name("tiny").to_json())
    (path / ckpt.PARAMS_DIR).mkdir()
    (path / ckpt.PARAMS_DIR / "garbage").write_text("x")
  with pytest.raises(ckpt.CheckpointError):
    ckpt.load_checkpoint(path)


def test_bad_gguf(tmp_path):
  pytest.importorskip("gguf", reason="the GGUF reader is not installed (pip install gguf)")
  f = tmp_path / "x.gguf"
  f.write_bytes(b"not a gguf file at all")
  with pytest.raises(ckpt.CheckpointError):
    ckpt.convert(str(f), tmp_path / "out", progress=False)
  with pytest.raises(ckpt.CheckpointError):
    ckpt.convert(str(tmp_path / "nope.gguf"), tmp_path / "out", progress=False)
