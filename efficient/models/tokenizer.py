"""Tokenizers: the byte-level BPE that a GGUF file describes (SmolLM2's), and a plain byte tokenizer for the
random-init test configs.

A GGUF carries no `tokenizer.json`, only llama.cpp metadata: `tokenizer.ggml.tokens` (the vocabulary, already
spelled in GPT-2's byte-to-unicode alphabet), `tokenizer.ggml.merges` ("a b" strings, best first),
`tokenizer.ggml.token_type` (3 = control, 4 = user-defined) and `tokenizer.ggml.pre` (which pre-tokenizer the
merges were learned with). We rebuild the `tokenizers` pipeline from those, so no hub download is needed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

# llama.cpp's token types (llama_token_type / gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4


def _pre_tokenizer(pre: str):
  """The pre-tokenizer named by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines it.

  'smollm' is llama.cpp's name for SmolLM/SmolLM2: every digit is its own piece, then GPT-2's regex (the
  original tokenizer.json says the same: Digits(individual_digits) + ByteLevel). The vocabulary has no
  multi-digit and no space+digit token, so plain GPT-2 splitting (what transformers' GGUF loader does) gives
  the same ids; we follow the model's own definition anyway.
  """
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("gpt2", "default"):
    return byte_level
  raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: ['default', 'gpt2', 'smollm'].")


class Tokenizer:
  """Byte-level BPE built from GGUF tokenizer metadata. `encode` adds no BOS (SmolLM2's GGUF says
  `add_bos_token = False`); special tokens written in the text (e.g. `<|im_start|>`) map to their single id."""

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None, *,
               pre: str = "default", bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False):
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError("tokenizer vocabulary has duplicate tokens.")
    pairs = []
    for merge in merges:
      left, _, right = merge.partition(" ")
      if not left or not right:
        raise ValueError(f"malformed BPE merge {merge!r}: expected 'left right'.")
      pairs.append((left, right))
    # GPT-2 style BPE: no unk token (every byte has a token), no subword prefixes.
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    token_types = list(token_types) if token_types is not None else [1] * len(tokens)
    # Control tokens must match whole in the text, and user-defined ones too (llama.cpp does both).
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    self._backend = backend
    self._tokens = list(tokens)
    self.vocab_size = len(tokens)
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
    self.add_bos = add_bos
    self.pre = pre

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, object], *, source: str = "<metadata>") -> "Tokenizer":
    """Builds the tokenizer from GGUF key/values (`efficient.models.gguf.read_metadata`)."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported.")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
      if key not in metadata:
        raise ValueError(f"{source}: GGUF metadata has no {key!r}, cannot build the tokenizer.")
    return cls(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"],
               metadata.get("tokenizer.ggml.token_type"), pre=metadata.get("tokenizer.ggml.pre", "default"),
               bos_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
               pad_id=metadata.get("tokenizer.ggml.padding_token_id"),
               unk_id=metadata.get("tokenizer.ggml.unknown_token_id"),
               add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (a BOS only if the GGUF asks for one; SmolLM2's does not)."""
    ids = self._backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are written out unless `skip_special_tokens`."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str:
    return self._tokens[token_id]

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre!r}, bos={self.bos_id}, eos={self.eos_id})"


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, for the random-init configs (`tiny`, `small`). Ids at or above 256 (a vocab
  larger than 256 has unused ones) decode to nothing. No special ids, so bos/eos/pad/unk are None."""

  vocab_size = 256
  bos_id = eos_id = pad_id = unk_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    del skip_special_tokens
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"
