"""Rollout records: bit-identical round trips of every dtype, atomic numbered files, every malformed file."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
import torch

from dsray.rl.records import (MAGIC, VERSION, RolloutWriter, encode_rollout, iter_rollouts, read_rollout,
                              write_rollout)


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "f32": f, "f64": f.double() * 1e300, "f16": f.half(), "bf16": f.bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (4, 2), generator=g), "i32": torch.randint(-2**31, 2**31 - 1, (7,)),
        "i16": torch.randint(-2**15, 2**15 - 1, (2, 3, 4), generator=g), "i8": torch.randint(-128, 127, (5,)).to(torch.int8),
        "u8": torch.randint(0, 255, (6,), generator=g).to(torch.uint8), "b": torch.rand(4, 4, generator=g) > 0.5,
        "empty": torch.zeros(0, 3, dtype=torch.int64), "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25), "scalar_i": torch.tensor(-7), "scalar_b": torch.tensor(True),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
        "strided": torch.arange(24).reshape(4, 6).T,  # non-contiguous view
    }


def raw_bytes(t: torch.Tensor) -> list[int]:
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def test_round_trip_bit_identical(tmp_path):
    batch = {**every_dtype(), "group_size": 4, "step": 12, "lr": 1e-5, "task": "sort", "flag": False,
             "lens": [3, 4, [5, 6]], "none": None}
    meta = {"model": "debug", "cfg": {"top_k": 4, "layers": [1, 2]}, "time": 1.5}
    p = write_rollout(tmp_path / "r.msgpack", batch, meta)
    got, got_meta = read_rollout(p)
    assert got_meta == meta
    assert set(got) == set(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            w = got[k]
            assert w.dtype == v.dtype and w.shape == v.shape, k
            assert raw_bytes(w) == raw_bytes(v), k  # bytes, not torch.equal: nan != nan, -0.0 == 0.0
        else:
            assert got[k] == v, k
    assert got["scalar"].ndim == 0 and got["scalar"].item() == 3.25


def test_typical_rollout_batch(tmp_path):
    B, T = 4, 9
    batch = {"ids": torch.randint(0, 259, (B, T)), "completion_mask": torch.rand(B, T - 1) > 0.3,
             "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0]), "logprobs": -torch.rand(B, T - 1),
             "routing": torch.randint(0, 16, (B, T, 2, 4)).to(torch.uint8),
             "advantages": torch.randn(B), "group_size": 2, "step": 0}
    got, meta = read_rollout(write_rollout(tmp_path / "x.msgpack", batch))
    assert meta == {}
    for k in ("ids", "completion_mask", "rewards", "logprobs", "routing", "advantages"):
        assert torch.equal(got[k], batch[k]), k
    assert got["group_size"] == 2 and got["step"] == 0


def test_writer_numbers_files_and_continues(tmp_path):
    w = RolloutWriter(tmp_path / "runs" / "a")  # parents created
    paths = [w.write({"step": i, "x": torch.full((2,), i)}) for i in range(3)]
    assert [p.name for p in paths] == [f"rollout-00000{i}.msgpack" for i in (1, 2, 3)]
    (w.folder / "notes.txt").write_text("not a rollout")
    (w.folder / ".rollout-000009.msgpack.abc.tmp").write_bytes(b"half")  # a crashed writer's temp file
    assert RolloutWriter(w.folder).write({"step": 3}).name == "rollout-000004.msgpack"
    seen = [(p.name, b["step"]) for p, b, _ in iter_rollouts(w.folder)]
    assert seen == [(f"rollout-00000{i + 1}.msgpack", i) for i in range(4)]
    assert [p.name for p in w.folder.iterdir() if p.name.endswith(".tmp")] == [".rollout-000009.msgpack.abc.tmp"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(iter_rollouts(tmp_path / "nowhere"))


def test_write_replaces_atomically_and_leaves_no_temp(tmp_path):
    p = tmp_path / "r.msgpack"
    write_rollout(p, {"v": 1})
    write_rollout(p, {"v": 2})
    assert read_rollout(p)[0] == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["r.msgpack"]
    with pytest.raises(ValueError, match="'bad'"):  # a failed encode leaves the old file alone
        write_rollout(p, {"bad": object()})
    assert read_rollout(p)[0] == {"v": 2} and sorted(os.listdir(tmp_path)) == ["r.msgpack"]


def test_write_errors_name_the_key(tmp_path):
    p = tmp_path / "r.msgpack"
    with pytest.raises(ValueError, match="'c'.*complex"):
        write_rollout(p, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match=r"'nested'\]\[1\]"):
        write_rollout(p, {"nested": [1, torch.zeros(2)]})
    with pytest.raises(ValueError, match="not a str"):
        write_rollout(p, {3: 1})
    with pytest.raises(ValueError, match="'big'.*64 bits"):
        write_rollout(p, {"big": 2**70})
    with pytest.raises(ValueError, match="meta"):
        write_rollout(p, {}, meta={"x": {1: 2}})
    with pytest.raises(ValueError, match="meta"):
        write_rollout(p, {}, meta=[1])
    assert not p.exists()


def _raw(tmp_path, doc, name="f.msgpack"):
    p = tmp_path / name
    p.write_bytes(msgpack.packb(doc, use_bin_type=True))
    return p


def good_doc(**tensor):
    rec = {"dtype": "float32", "shape": [2], "data": b"\0" * 8, **tensor}
    return {"format": MAGIC, "version": VERSION, "meta": {}, "tensors": {"t": rec}, "values": {}}


@pytest.mark.parametrize("doc,what", [
    ({"ids": [1, 2, 3]}, "not a dsray rollout"),  # a foreign msgpack map
    ([1, 2, 3], "not a dsray rollout"),
    ({**good_doc(), "format": "other"}, "not a dsray rollout"),
    ({**good_doc(), "version": 99}, "version 99"),
    ({**good_doc(), "version": None}, "version None"),
    ({**good_doc(), "version": True}, "version True"),
    (good_doc(dtype="float8"), "unknown dtype 'float8'"),
    (good_doc(data=b"\0" * 7), "7 bytes of data.*needs 8"),
    (good_doc(shape=[3]), "8 bytes of data.*needs 12"),
    (good_doc(shape=[-1]), "shape"),
    (good_doc(shape="2"), "shape"),
    (good_doc(data="text"), "data is str"),
    (good_doc(dtype="bool", shape=[8]), None),  # valid: all zero bytes
    (good_doc(dtype="bool", shape=[8], data=b"\2" + b"\0" * 7), "bool data"),
    ({**good_doc(), "tensors": []}, "'tensors'"),
    ({**good_doc(), "values": {"t": 1}}, "both tensors and values"),
])
def test_malformed_files_raise_value_error_naming_file(tmp_path, doc, what):
    p = _raw(tmp_path, doc)
    if what is None:
        read_rollout(p)
        return
    with pytest.raises(ValueError, match=what) as e:
        read_rollout(p)
    assert str(p) in str(e.value)


def test_truncated_file(tmp_path):
    p = write_rollout(tmp_path / "r.msgpack", every_dtype(), {"k": "v"})
    blob = p.read_bytes()
    for cut in (1, 10, len(blob) // 2, len(blob) - 1):
        q = tmp_path / f"cut{cut}.msgpack"
        q.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not a readable msgpack") as e:
            read_rollout(q)
        assert str(q) in str(e.value)
    (tmp_path / "empty.msgpack").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.msgpack"):
        read_rollout(tmp_path / "empty.msgpack")


def test_random_and_foreign_bytes(tmp_path):
    rng = random.Random(0)
    p = tmp_path / "junk.bin"
    for i in range(300):
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        with pytest.raises(ValueError, match="junk.bin"):
            read_rollout(p)
    p.write_text("{\"format\": \"dsray-rollout\"}\n")  # JSON is not msgpack
    with pytest.raises(ValueError, match="junk.bin"):
        read_rollout(p)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_rollout(tmp_path / "missing.msgpack")


def test_data_is_little_endian():
    doc = msgpack.unpackb(encode_rollout({"x": torch.tensor([1, 256], dtype=torch.int32),
                                          "h": torch.tensor([1.0], dtype=torch.bfloat16)}))
    assert doc["tensors"]["x"] == {"dtype": "int32", "shape": [2], "data": b"\x01\0\0\0\0\x01\0\0"}
    assert doc["tensors"]["h"]["data"] == b"\x80\x3f"  # bf16 1.0 = 0x3f80


def test_encode_is_deterministic():
    b = every_dtype()
    assert encode_rollout(b, {"a": 1}) == encode_rollout(b, {"a": 1})
