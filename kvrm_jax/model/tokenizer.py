"""Text <-> token ids, and chat prompts, matching HF transformers for the same model file.

Built on HF's Rust `tokenizers`. A GGUF carries no `tokenizer.json`, only llama.cpp metadata
(vocabulary, merges, token types, special ids); `from_gguf` rebuilds the backend the way
transformers 5.x does (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so ids agree.
`to_json_str` packs the backend JSON and our extras into one string for checkpoints.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

_JSON_FORMAT = "kvrm-tokenizer"
_JSON_VERSION = 1
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# llama.cpp token types (gguf `tokenizer.ggml.token_type`).
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes transformers applies per `tokenizer.ggml.pre`; any other value keeps GPT-2's
# ByteLevel regex (that includes 'smollm'). Copied from transformers 5.x.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
  **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                   "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
  "tekken": _TEKKEN_SPLIT,
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
  "qwen35": _QWEN35_SPLIT,
  **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
  # GPT-2's reversible byte -> printable-char table (the ByteLevel alphabet).
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _gguf_metadata(path: str) -> dict[str, Any]:

  reader = gguf.GGUFReader(path)
  return {k: f.contents() for k, f in reader.fields.items()
          if k.startswith("tokenizer.") or k == "general.architecture"}


def _byte_level_backend(meta: dict[str, Any]) -> _Backend:
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or ()
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # A few files store raw text for some tokens; respell those in the byte alphabet as HF does.
  vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or ()]
  backend = _Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  backend.decoder = decoders.ByteLevel()
  # Control tokens stay whole and are skippable; one outside the byte alphabet is a llama.cpp
  # mislabel (adding it would grow the vocab), so HF skips it and so do we.
  control = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
  if control:
    backend.add_special_tokens(control)
  present = backend.get_vocab(with_added_tokens=True)
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in present]
  if user:
    backend.add_tokens(user)
  return backend


def _template_post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
  # Same shape as transformers' `update_post_processor`.
  single = (f"{bos[0]}:0 " if bos else "") + "$A:0" + (f" {eos[0]}:0" if eos else "")
  pair = single + (f" {bos[0]}:1" if bos else "") + " $B:1" + (f" {eos[0]}:1" if eos else "")
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])


def _ensure_special(backend: _Backend, specials: dict[str, str | None]):
  # transformers registers bos/eos/unk/pad as special added tokens when they are not already.
  added = {t.content for t in backend.get_added_tokens_decoder().values()}
  missing = [AddedToken(s, special=True, normalized=False)
             for s in dict.fromkeys(v for v in specials.values() if v) if s not in added]
  if missing:
    backend.add_tokens(missing)


def _token_str(tok: Any) -> str | None:
  if isinstance(tok, dict):  # tokenizer_config.json may store AddedToken dicts
    return tok.get("content")
  return tok


def _as_id_list(x: Any) -> list[int]:
  if x is None:
    return []
  return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  # Mirrors transformers' chat-template environment (sandboxed, trim/lstrip blocks, its globals).
  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


class Tokenizer:
  """Encodes/decodes text and renders chat prompts exactly as HF transformers does for the same model.

  Attributes:
    vocab_size: number of ids the tokenizer can produce (base vocab plus added tokens).
    bos_id, eos_id, pad_id: special ids, or None when the model has none.
    eos_ids: every id that ends generation (eos plus any end-of-turn ids the model declares).
    add_bos: whether `encode` prepends BOS.
    chat_template: jinja2 source, or None.
  """

  def __init__(self, backend: _Backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
               eos_ids: tuple[int, ...] = (), add_bos: bool = False, chat_template: str | None = None,
               special_tokens: dict[str, str | None] | None = None):
    self._backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.eos_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(eos_ids)))
    self.add_bos = add_bos
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_gguf(cls, path: str) -> Tokenizer:
    """Build from a GGUF file's `tokenizer.*` metadata (byte-level BPE, `tokenizer.ggml.model == 'gpt2'`)."""
    meta = _gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    backend = _byte_level_backend(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in (
      ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    specials = {name: (tokens[i] if i is not None else None) for name, i in ids.items()}
    _ensure_special(backend, specials)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and ids["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos_token"] is not None
    backend.post_processor = _template_post_processor(
      (specials["bos_token"], ids["bos_token"]) if add_bos else None,
      (specials["eos_token"], ids["eos_token"]) if add_eos else None)
    # llama.cpp also stops on end-of-turn / end-of-message tokens when the file names them.
    extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return cls(backend, bos_id=ids["bos_token"], eos_id=ids["eos_token"], pad_id=ids["pad_token"],
               eos_ids=tuple(int(i) for i in extra_eos), add_bos=add_bos,
               chat_template=meta.get("tokenizer.chat_template"), special_tokens=specials)

  @classmethod
  def from_hf_dir(cls, path: str) -> Tokenizer:
    """Build from a HF folder: `tokenizer.json`, plus `tokenizer_config.json` / chat template /
    `generation_config.json` when present."""
    backend = _Backend.from_file(os.path.join(path, "tokenizer.json"))
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    specials = {name: _token_str(cfg.get(name)) for name in _SPECIAL_NAMES}
    _ensure_special(backend, specials)
    tid = lambda s: backend.token_to_id(s) if s is not None else None  # noqa: E731
    bos_id, eos_id, pad_id = tid(specials["bos_token"]), tid(specials["eos_token"]), tid(specials["pad_token"])
    # As in transformers: an explicit add_bos/add_eos (or no post-processor) rebuilds the template.
    if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
      add_bos = bool(cfg.get("add_bos_token")) and bos_id is not None
      add_eos = bool(cfg.get("add_eos_token")) and eos_id is not None
      backend.post_processor = _template_post_processor(
        (specials["bos_token"], bos_id) if add_bos else None, (specials["eos_token"], eos_id) if add_eos else None)
    probe = backend.encode("").ids
    add_bos = bos_id is not None and probe[:1] == [bos_id]
    eos_ids = []
    for name in ("generation_config.json", "config.json"):
      eos_ids += _as_id_list(_read_json(os.path.join(path, name)).get("eos_token_id"))
    return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, eos_ids=tuple(eos_ids), add_bos=add_bos,
               chat_template=_hf_chat_template(path, cfg), special_tokens=specials)

  @classmethod
  def from_json_str(cls, s: str) -> Tokenizer:
    """Inverse of `to_json_str`."""
    d = json.loads(s)
    if d.get("format") != _JSON_FORMAT:
      raise ValueError(f"not a {_JSON_FORMAT} JSON string (format={d.get('format')!r})")
    if d.get("version") != _JSON_VERSION:
      raise ValueError(f"unsupported {_JSON_FORMAT} version {d.get('version')!r}")
    backend = _Backend.from_str(json.dumps(d["backend"]))
    return cls(backend, bos_id=d["bos_id"], eos_id=d["eos_id"], pad_id=d["pad_id"], eos_ids=tuple(d["eos_ids"]),
               add_bos=d["add_bos"], chat_template=d["chat_template"], special_tokens=d["special_tokens"])

  def to_json_str(self) -> str:
    """One JSON string: the `tokenizers` backend JSON plus special ids, add_bos and the chat template."""
    return json.dumps({
      "format": _JSON_FORMAT, "version": _JSON_VERSION,
      "bos_id": self.bos_id, "eos_id": self.eos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
      "add_bos": self.add_bos, "chat_template": self.chat_template, "special_tokens": self.special_tokens,
      "backend": json.loads(self._backend.to_str()),
    }, ensure_ascii=False)

  def encode(self, text: str) -> list[int]:
    """Token ids for `text`; special tokens written in the text map to their ids; BOS only if `add_bos`."""
    return self._backend.encode(text, add_special_tokens=True).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """Text for `ids` (any int sequence or 1-D array); invalid UTF-8 byte runs become U+FFFD."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    """The vocabulary string for id `i` (byte-level spelling for BPE), or None."""
    return self._backend.id_to_token(int(i))

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Render `messages` with the model's jinja2 chat template (sandboxed), as transformers'
    `apply_chat_template(messages, tokenize=False)` does. Extra kwargs reach the template."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template")
    ctx = {k: v for k, v in self.special_tokens.items() if v is not None}
    ctx.update(tools=None, documents=None)
    ctx.update(kwargs)
    return _compile_template(self.chat_template).render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **ctx)


def _hf_chat_template(path: str, cfg: dict[str, Any]) -> str | None:
  # transformers 5 saves chat_template.jinja; older folders keep it in chat_template.json or the config.
  jinja_path = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read()
  tmpl = _read_json(os.path.join(path, "chat_template.json")).get("chat_template") or cfg.get("chat_template")
  if isinstance(tmpl, list):  # named templates: [{"name": ..., "template": ...}]
    named = {t["name"]: t["template"] for t in tmpl}
    tmpl = named.get("default", next(iter(named.values()), None))
  return tmpl
