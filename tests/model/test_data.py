"""Byte tokenizer, text batches and the skewed balance-test batches (dsray/data.py)."""

from __future__ import annotations

import pytest
import torch

from dsray.data import ByteTokenizer, TextBatches, default_corpus_path, skewed_batch

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    s = "Hello, wörld! — 日本語 ✓ 🙂\n\ttab"
    ids = tok.encode(s)
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len(s.encode("utf-8"))
    assert tok.decode(ids) == s
    assert tok.encode(s, bos=False) == ids[1:]
    assert tok.decode(torch.tensor([tok.bos_id, *ids[1:], tok.eos_id, tok.pad_id])) == s
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # cut mid-character: replaced, no raise
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)


def test_batches_shape_and_determinism():
    a = TextBatches(TEXT, seq_len=32, batch_size=4, seed=3)
    b = TextBatches(TEXT, seq_len=32, batch_size=4, seed=3)
    c = TextBatches(TEXT, seq_len=32, batch_size=4, seed=4)
    xa, xb, xc = a.next_batch(), b.next_batch(), c.next_batch()
    assert xa.shape == (4, 32) and xa.dtype == torch.long
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert not torch.equal(a.next_batch(), xa)  # the stream moves on
    it = iter(TextBatches(TEXT, seq_len=32, batch_size=4, seed=3))
    assert torch.equal(next(it), xa)
    assert torch.equal(a.val_batch(), a.val_batch()) and a.val_batch().shape == (4, 32)


def test_windows_come_from_the_split():
    tb = TextBatches(TEXT, seq_len=24, batch_size=16, seed=0, val_fraction=0.1)
    raw = TEXT.encode()
    train, val = raw[: len(raw) - int(len(raw) * 0.1)], raw[len(raw) - int(len(raw) * 0.1):]
    for row in tb.next_batch():
        assert bytes(row.tolist()) in train
    for row in tb.val_batch():
        assert bytes(row.tolist()) in val
    vb = TextBatches(TEXT, seq_len=24, batch_size=8, seed=0, split="val", val_fraction=0.1)
    for row in vb.next_batch():
        assert bytes(row.tolist()) in val


def test_file_and_packaged_corpus(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("ünïcode " * 50, encoding="utf-8")
    tb = TextBatches(f, seq_len=16, batch_size=2)
    assert tb.source == str(f) and tb.n_tokens == len(("ünïcode " * 50).encode())
    assert TextBatches(str(f), seq_len=16, batch_size=2).n_tokens == tb.n_tokens
    assert TextBatches.from_text("one line, long enough", seq_len=8, batch_size=2, val_fraction=0).n_tokens == 21

    corpus = default_corpus_path()
    assert corpus.is_file() and corpus.name == "corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode()) <= 1_100_000 and "To be, or not to be" in text
    batch = TextBatches(corpus, seq_len=64, batch_size=8, seed=1).next_batch()
    assert batch.shape == (8, 64) and int(batch.max()) < 256


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextBatches(missing, seq_len=8, batch_size=1)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match=r"short\.txt.*seq_len\+1 = 9"):
        TextBatches(short, seq_len=8, batch_size=1, val_fraction=0)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème ".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"latin1\.txt.*not UTF-8"):
        TextBatches(latin1, seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="seq_len"):
        TextBatches(TEXT, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="split"):
        TextBatches(TEXT, seq_len=8, batch_size=1, split="test")
    with pytest.raises(ValueError, match="val split"):
        TextBatches(TEXT, seq_len=8, batch_size=1, val_fraction=0.0).val_batch()


def test_skewed_batch():
    x = skewed_batch(vocab_size=320, batch_size=8, seq_len=128, seed=0)
    assert x.shape == (8, 128) and x.dtype == torch.long and 0 <= int(x.min()) and int(x.max()) < 320
    assert torch.equal(x, skewed_batch(320, 8, 128, seed=0)) and not torch.equal(x, skewed_batch(320, 8, 128, seed=1))
    hot = torch.arange(4) * 80
    share = torch.isin(x, hot).float().mean().item()
    assert 0.85 < share < 0.95, share
    # the same hot ids for every seed: balance tests keep hitting the same experts
    assert torch.isin(skewed_batch(320, 8, 128, seed=7), hot).float().mean() > 0.85
    assert torch.isin(skewed_batch(320, 8, 128, seed=0, hot_fraction=0.0), hot).float().mean() < 0.1
    with pytest.raises(ValueError, match="n_hot_tokens"):
        skewed_batch(10, 1, 1, 0, n_hot_tokens=11)
