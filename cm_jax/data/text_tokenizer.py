"""CLIP tokenization for the text-conditioned latent models (Stable Diffusion style).

`load_tokenizer` opens a diffusers pipeline's `tokenizer/` folder (CLIP's byte-level BPE:
`vocab.json` + `merges.txt`, Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision") with transformers' `CLIPTokenizer`; `tokenize` turns prompts
into the fixed-length id rows the text encoder takes, the way diffusers'
StableDiffusionPipeline.encode_prompt does (pad to `model_max_length` = 77 with the pad
token, truncate longer prompts keeping the end-of-text token, and say what was cut).

`write_word_level_tokenizer` builds, offline, a tiny tokenizer folder in the same format whose
vocabulary holds every byte-level character plus a given list of whole words, so tests and
small text-conditioned teachers need no download; `builtin_tokenizer("digits")` is the one
over the digits captions ("a handwritten digit zero" .. "nine"). No torch here.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import unicodedata
from typing import Iterable, Sequence

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_SUFFIX = "</w>"  # CLIP's BPE marks the last symbol of a word with this suffix
_FILES = ("vocab.json", "merges.txt")
# The built-in word-level vocabularies (words in the order they get their merges).
_BUILTIN_WORDS = {
    "digits": ("a", "handwritten", "digit", "zero", "one", "two", "three", "four", "five",
               "six", "seven", "eight", "nine"),
}


def load_tokenizer(folder: str):
  """The transformers `CLIPTokenizer` stored in `folder` (a diffusers pipeline's
  `tokenizer/`): vocab.json + merges.txt (the released SD 1.x layout), or the single
  tokenizer.json that transformers 5's save_pretrained writes."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    for name in _FILES:
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer folder {folder!r} has no {name} ({path} is "
                                f"missing) and no tokenizer.json")
  from transformers import CLIPTokenizer  # deferred: transformers is slow to import
  return CLIPTokenizer.from_pretrained(folder)


# Names data.tokenizer / method.tokenizer accept besides a tokenizer folder.
BUILTIN = tuple(_BUILTIN_WORDS)


@functools.lru_cache(maxsize=None)
def builtin_tokenizer(name: str):
  """A word-level CLIP tokenizer built offline (`write_word_level_tokenizer`) over one of
  the built-in word lists; "digits" covers the digits captions. Built once per process:
  the same words always give the same ids, so a run's text encoder config stays valid."""
  if name not in _BUILTIN_WORDS:
    raise ValueError(f"builtin_tokenizer: unknown name {name!r} "
                     f"(known: {', '.join(sorted(_BUILTIN_WORDS))})")
  with tempfile.TemporaryDirectory(prefix=f"cm_jax_{name}_tokenizer_") as folder:
    # The loaded tokenizer keeps everything in memory; the folder is only the format.
    return load_tokenizer(write_word_level_tokenizer(_BUILTIN_WORDS[name], folder))


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """int32 ids of shape (B, max_length): padded with the pad token to `max_length`
  (default `tokenizer.model_max_length`), longer prompts truncated to their first
  max_length - 1 tokens plus the end-of-text token, exactly like diffusers' pipelines.

  A truncation prints one warning line to stderr with the removed text, as diffusers logs it.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  length = int(max_length or tokenizer.model_max_length)
  ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                  return_tensors="np").input_ids.astype(np.int32)
  # diffusers re-tokenizes without truncation and decodes what fell between the kept
  # tokens and the final end-of-text token.
  full = tokenizer(prompts).input_ids
  removed = [tokenizer.decode(row[length - 1:-1]) for row in full if len(row) > length]
  if removed:
    print(f"warning: prompt truncated to {length} tokens: " + " | ".join(removed),
          file=sys.stderr)
  return ids


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP byte-level alphabet: each byte -> a printable character (printable
  Latin-1 bytes map to themselves, the rest to code points from 256 on), so BPE never
  sees whitespace or control characters."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _normalize_word(word: str, alphabet: dict[int, str]) -> str:
  """The byte-level string CLIPTokenizer's model sees for `word` (its normalizer applies
  NFC and lower-casing before the byte-level pre-tokenizer)."""
  word = unicodedata.normalize("NFC", word).lower()
  return "".join(alphabet[b] for b in word.encode("utf-8"))


def _bpe_pieces(vocab: dict[str, int], merges: list[tuple[str, str]], word: str) -> list[str]:
  """How the `tokenizers` BPE model (configured like CLIPTokenizer's) splits one word."""
  from tokenizers.models import BPE
  model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
              end_of_word_suffix=_SUFFIX, unk_token=EOS, fuse_unk=False, dropout=None)
  return [t.value for t in model.tokenize(word)]


def write_word_level_tokenizer(words: Iterable[str], out_dir: str,
                               model_max_length: int = 77) -> str:
  """Writes a small CLIP BPE tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json) to `out_dir` and returns `out_dir`.

  The vocabulary is laid out like CLIP's: the 256 byte-level characters, the same with the
  "</w>" suffix, then one token per merge, then <|startoftext|> and <|endoftext|> last (the
  latter doubles as pad and unknown token, as in SD 1.5's tokenizer). Each word in `words`
  becomes the single token "word</w>". Its merges are found greedily: while the BPE model
  still splits the word, merge its first two pieces, appended at the lowest priority. A
  merge added last only fires once no earlier merge applies, so words already reduced to
  one token stay one token.
  """
  alphabet = _bytes_to_unicode()
  chars = list(alphabet.values())
  vocab: dict[str, int] = {}
  for token in chars + [c + _SUFFIX for c in chars]:
    vocab[token] = len(vocab)
  merges: list[tuple[str, str]] = []
  for raw in dict.fromkeys(words):  # de-duplicated, first-seen order
    word = _normalize_word(raw, alphabet)
    if not word:
      raise ValueError("write_word_level_tokenizer: empty word")
    pieces = _bpe_pieces(vocab, merges, word)
    while len(pieces) > 1:
      merges.append((pieces[0], pieces[1]))
      vocab.setdefault(pieces[0] + pieces[1], len(vocab))
      pieces = _bpe_pieces(vocab, merges, word)
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")  # the header line CLIP's merges.txt starts with
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                do_lower_case=True, errors="replace", add_prefix_space=False)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  _check_words(out_dir, words, vocab)
  return out_dir


def _check_words(out_dir: str, words: Iterable[str], vocab: dict[str, int]) -> None:
  """Each word must come out of the full CLIPTokenizer (normalizer and pre-tokenizer
  included) as its one token; a word the pre-tokenizer splits (e.g. "abc1", "it's") cannot."""
  tokenizer = load_tokenizer(out_dir)
  alphabet = _bytes_to_unicode()
  for raw in dict.fromkeys(words):
    want = [vocab[BOS], vocab[_normalize_word(raw, alphabet) + _SUFFIX], vocab[EOS]]
    if tokenizer(raw).input_ids != want:
      raise ValueError(f"write_word_level_tokenizer: {raw!r} is not one CLIP word "
                       f"(the pre-tokenizer splits it); pass letters-only words")
