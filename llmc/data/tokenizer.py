"""The GPT-2 tokenizer, fully offline.

The BPE ranks ship inside the package (`llmc/assets/r50k_base.tiktoken`, byte-identical to
tiktoken's r50k_base file); tiktoken does the encoding. `<|endoftext|>` (50256) separates
documents in every llmc dataset.
"""
from __future__ import annotations

import functools

from llmc import assets

EOT = 50256
VOCAB_SIZE = 50257
# The GPT-2 split pattern (tiktoken's r50k_base).
_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The tiktoken Encoding for GPT-2, loaded from the vendored vocabulary."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = assets.path("r50k_base.tiktoken")
    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(name="gpt2", pat_str=_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def encode(text: str) -> list:
    """text -> token ids; special-token text is encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """token ids -> text (ids >= 50257, the padded rows, are not valid tokens)."""
    return get_encoding().decode([int(i) for i in ids])
