"""The offline GPT-2 tokenizer: known ids, round trip, and the vendored vocabulary's integrity.

Run: pytest tests/test_tokenizer.py
"""
import hashlib

from llmc import assets

from llmc.data import tokenizer


def test_known_ids():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" the") == [262]
    assert tokenizer.encode("<|endoftext|>") != [tokenizer.EOT]  # special text stays plain text


def test_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak. 123 ünïcödé ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_eot_and_vocab():
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT]


def test_vendored_vocabulary_is_tiktokens_r50k():
    data = assets.path("r50k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == \
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
