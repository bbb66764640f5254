"""Streaming text from token ids: never a broken multi-byte character, stop strings cut off.

Byte-level BPE splits one character into several tokens (an emoji is often 3-4); decoding a prefix
that ends inside a character yields U+FFFD. `IncrementalDetokenizer` holds such a tail back until
the character completes (the approach of HF text-generation-inference: decode from the previous
offset, emit only the growth, never a trailing U+FFFD).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
  """Feed token ids as they come; get the text they complete."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self._prefix = 0  # decoding starts here: the context that fixes spacing of the next piece
    self._read = 0  # ids before this are already emitted as text

  def add(self, ids) -> str:
    """Text completed by these ids ('' while a multi-byte character is unfinished)."""
    self.ids.extend(int(i) for i in ids)
    if len(self.ids) == self._read:
      return ""
    prefix = self.tokenizer.decode(self.ids[self._prefix:self._read])
    full = self.tokenizer.decode(self.ids[self._prefix:])
    if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
      self._prefix, self._read = self._read, len(self.ids)
      return full[len(prefix):]
    return ""

  def flush(self) -> str:
    """Whatever is held back (at the end of the stream an unfinished character stays U+FFFD)."""
    prefix = self.tokenizer.decode(self.ids[self._prefix:self._read])
    full = self.tokenizer.decode(self.ids[self._prefix:])
    self._prefix = self._read = len(self.ids)
    return full[len(prefix):]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
  """(text before the earliest stop string, whether one occurred)."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
  return (text, False) if cut < 0 else (text[:cut], True)


class TextStream:
  """Incremental text of one request with OpenAI's stop-string semantics: the text ends before the
  first stop string, which is not returned. Text that might begin a stop string is held back."""

  def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
    self.detok = IncrementalDetokenizer(tokenizer)
    self.stop = tuple(stop)
    self._hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
    self._pending = ""
    self.stopped = False

  def add(self, ids) -> str:
    """Text safe to emit now."""
    if self.stopped:
      return ""
    return self._emit(self.detok.add(ids), final=False)

  def finish(self) -> str:
    """The rest of the text (the stream ended)."""
    if self.stopped:
      return ""
    return self._emit(self.detok.flush(), final=True)

  def _emit(self, new: str, final: bool) -> str:
    text = self._pending + new
    if self.stop:
      text, self.stopped = cut_at_stop(text, self.stop)
      if self.stopped:
        self._pending = ""
        return text
    keep = 0 if final else min(self._hold, len(text))
    self._pending = text[len(text) - keep:] if keep else ""
    return text[:len(text) - keep]


def full_text(tokenizer, ids, stop: tuple[str, ...] = ()) -> tuple[str, bool]:
  """The whole text of a finished request (non-streaming) cut at the first stop string, and whether
  one occurred."""
  return cut_at_stop(tokenizer.decode(ids), tuple(stop))
