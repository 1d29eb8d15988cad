"""Pure tests of prepared token data: prepare-data's shards and index, their memory-mapped reading
(checked against the in-memory PackedDataset), the config checks, and tokenizer training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from meshtrain.cli import main
from meshtrain.config import Config, ConfigError, load_config
from meshtrain.data import build_dataset, build_tokenizer
from meshtrain.data.dataset import PackedDataset, TokenDataset
from meshtrain.data.shard_writer import ShardWriter, read_index
from meshtrain.data.shards import INCOMPLETE, claim_output, dtype_for, has_val_split, read_meta, write_meta
from meshtrain.data.tokenizer import BYTE_EOS
from meshtrain.validate import validate

pytestmark = pytest.mark.pure
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
DOCS = [f"document {i}: " + "héllo wörld " * (i % 5 + 1) for i in range(40)]


def prepare(out: Path, *inputs: Path, tokenizer: str = "byte", extra: tuple[str, ...] = ()) -> int:
    args = ["prepare-data", "--input", *map(str, inputs), "--tokenizer", tokenizer, "--out", str(out)]
    return main([*args, "--workers", "1", *extra])


def documents(root: Path, split: str) -> list[np.ndarray]:
    """Every document of a split, read back through the shards' index files."""
    meta = read_meta(root)
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(root / f"{shard['name']}.bin", dtype=meta["dtype"])
        index = read_index(root / f"{shard['name']}.idx")
        assert index[0] == 0 and index[-1] == len(tokens) == shard["tokens"]
        docs += [tokens[a:b] for a, b in zip(index[:-1], index[1:])]
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_jsonl_and_text_files_become_documents_each_ended_by_eos(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", DOCS[:30])
    for i, text in enumerate(DOCS[30:]):
        (corpus / f"b{i}.txt").write_text(text)
    (corpus / "skip.bin").write_bytes(b"\x00\x01")  # not a suffix read from folders
    assert prepare(tmp_path / "out", corpus, extra=("--val-fraction", "0.1", "--shard-tokens", "300")) == 0
    meta = read_meta(tmp_path / "out")
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint16", 256, BYTE_EOS)
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    assert len(meta["splits"]["train"]["shards"]) > 1 and len(val) == 4  # round(40 * 0.1) whole documents
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (36, 4)
    tok = build_tokenizer("byte")
    assert all(doc[-1] == BYTE_EOS and BYTE_EOS not in doc[:-1] for doc in train + val)
    texts = [tok.decode(doc[:-1].tolist()) for doc in train + val]
    assert sorted(texts) == sorted(DOCS)  # every document once, in one split or the other
    held = [tok.decode(doc[:-1].tolist()) for doc in val]
    assert held == [DOCS[i] for i in (4, 14, 24, 34)]  # spread evenly, in input order
    assert not (tmp_path / "out" / INCOMPLETE).exists()


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[:5], "id": list(range(5))}), tmp_path / "d.parquet")
    assert prepare(tmp_path / "out", tmp_path / "d.parquet") == 0
    docs = documents(tmp_path / "out", "train")
    assert [build_tokenizer("byte").decode(d[:-1].tolist()) for d in docs] == DOCS[:5]


def write_shards(root: Path, dtype: str, stream: np.ndarray, lengths: np.ndarray, shard_tokens: int) -> None:
    """The train split of `stream` (documents of `lengths`), added in several batches as prepare-data does."""
    claim_output(root, overwrite=False)
    writer = ShardWriter(root, "train", dtype, shard_tokens)
    ends = np.cumsum(lengths)
    for part in np.array_split(np.arange(len(lengths)), 3):
        if len(part):
            lo = int(ends[part[0]] - lengths[part[0]])
            writer.add(stream[lo : int(ends[part[-1]])], lengths[part])
    splits = {"train": writer.close(), "val": ShardWriter(root, "val", dtype, shard_tokens).close()}
    write_meta(root, {"dtype": dtype, "vocab_size": int(stream.max()) + 1, "splits": splits})


def test_uint32_shards_hold_ids_past_65535(tmp_path: Path) -> None:
    tmp_path = tmp_path / "data"
    assert (dtype_for(256), dtype_for(65536), dtype_for(65537)) == ("uint16", "uint16", "uint32")
    stream = np.array([70_000, 1, 99_999, 5, 2**20, 7], dtype=np.uint32)
    write_shards(tmp_path, "uint32", stream, np.array([2, 2, 1, 1]), shard_tokens=4)
    assert [s["documents"] for s in read_meta(tmp_path)["splits"]["train"]["shards"]] == [2, 2]  # closed at >= 4
    x, y = TokenDataset(tmp_path, "train", seq_len=2).batch(np.array([0, 1]))
    assert x.tolist() == [[70_000, 1], [99_999, 5]] and y.tolist() == [[1, 99_999], [5, 2**20]]


@pytest.mark.parametrize("seq_len", [7, 64])
def test_memmap_batches_equal_the_in_memory_datasets(tmp_path: Path, seq_len: int) -> None:
    """The oracle: PackedDataset over the same stream, held whole in memory. Small shards put many
    windows across shard boundaries."""
    tmp_path = tmp_path / "data"
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(1, 60, size=200)
    stream = rng.integers(0, 256, size=int(lengths.sum())).astype(np.uint16)
    write_shards(tmp_path, "uint16", stream, lengths, shard_tokens=500)
    mapped, packed = TokenDataset(tmp_path, "train", seq_len), PackedDataset(stream, seq_len)
    assert len(mapped) == len(packed) and len(read_meta(tmp_path)["splits"]["train"]["shards"]) > 5
    for indices in (np.arange(len(packed)), rng.permutation(len(packed))[:8], np.array([len(packed) - 1])):
        for got, want in zip(mapped.batch(indices), packed.batch(indices)):
            assert got.dtype == want.dtype and got.shape == want.shape and torch_equal(got, want)


def torch_equal(a: object, b: object) -> bool:
    import torch

    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return bool(torch.equal(a, b))


def test_prepare_data_never_overwrites_what_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    (theirs / "train-00000.bin").write_bytes(b"also theirs")  # our name, but no marker or meta.json
    assert prepare(theirs, corpus) == 2
    assert "is not empty and holds 'notes.txt'" in capsys.readouterr().err
    (theirs / "notes.txt").unlink()
    assert prepare(theirs, corpus) == 2 and (theirs / "train-00000.bin").read_bytes() == b"also theirs"
    ours = tmp_path / "ours"
    assert prepare(ours, corpus) == 0
    before = read_meta(ours)
    assert prepare(ours, corpus) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert prepare(ours, corpus, extra=("--overwrite", "--val-fraction", "0.25")) == 0
    assert read_meta(ours)["splits"]["val"]["documents"] == 10 != before["splits"]["val"]["documents"]


def test_an_interrupted_run_is_not_mistaken_for_finished_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_output(out, overwrite=False)  # what a run killed while writing leaves: the marker, a shard
    (out / "train-00000.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(ConfigError, match="holds an interrupted prepare-data run"):
        read_meta(out)
    marker = (out / INCOMPLETE).read_text()
    (out / INCOMPLETE).write_text(f"prepare-data (pid {os.getppid()}) is writing this folder\n")  # a live process
    with pytest.raises(ConfigError, match=f"is being written by prepare-data \\(pid {os.getppid()}\\)"):
        claim_output(out, overwrite=True)
    (out / INCOMPLETE).write_text(marker)
    assert prepare(out, write_jsonl(tmp_path / "c.jsonl", DOCS)) == 0  # its own leftovers: replaced freely
    assert read_meta(out)["splits"]["train"]["documents"] == len(DOCS)
    (out / "train-00000.bin").write_bytes(b"\x01\x00")  # truncated after the fact
    with pytest.raises(ConfigError, match="should hold"):
        read_meta(out)


def config(*overrides: str) -> Config:
    return validate(load_config(TINY, list(overrides)), 1)


def test_source_tokens_is_checked_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert prepare(out, write_jsonl(tmp_path / "c.jsonl", DOCS), extra=("--val-fraction", "0.1")) == 0
    tokens = ("data.source=tokens", f"data.path={out}")
    cases = {
        "needs data.path": ("data.source=tokens",),
        "holds no prepared data": ("data.source=tokens", f"data.path={tmp_path}"),
        "is not a folder": ("data.source=tokens", f"data.path={tmp_path / 'nowhere'}"),
        "does not apply to data.source=tokens": (*tokens, "data.val_fraction=0.1"),
        "fewer than one training.global_batch": (*tokens, "training.global_batch=512", "training.micro_batch=64"),
        "is below the 256 token ids": (*tokens, "model.vocab_size=128"),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            config(*overrides)
    cfg = config(*tokens)
    assert has_val_split(cfg.data) and not has_val_split(config().data)
    tok = build_tokenizer("byte")
    train = build_dataset(cfg.data, tok, 32, seed=0)
    val = build_dataset(cfg.data, tok, 32, seed=0, split="val")
    meta = read_meta(out)
    assert (len(train), len(val)) == (
        (meta["splits"]["train"]["tokens"] - 1) // 32,
        (meta["splits"]["val"]["tokens"] - 1) // 32,
    )


def test_a_trained_tokenizer_round_trips_and_prepares_data(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", DOCS)
    (corpus / "b.md").write_text("# Ünïcode and emoji 🙂\n\n" + "def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "tok.json"
    train = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "320", "--out", str(out)]
    assert main(train) == 0
    assert main(train) == 2 and main([*train, "--overwrite"]) == 0  # an existing file is replaced only when asked
    tok = build_tokenizer(str(out))
    assert 256 < tok.vocab_size <= 320 and tok.eos_id is not None  # a small corpus may not fill it
    for text in ("héllo wörld 🙂 unseen: ∑ξ\ttabs\n", (corpus / "b.md").read_text(), DOCS[3]):
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text and int(ids.max()) < tok.vocab_size
    assert len(tok.encode(DOCS[3])) < len(DOCS[3].encode())  # the merges compress
    assert prepare(tmp_path / "data", corpus, tokenizer=str(out)) == 0
    meta = read_meta(tmp_path / "data")
    assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer"]) == (tok.vocab_size, tok.eos_id, str(out))
    assert all(doc[-1] == tok.eos_id for doc in documents(tmp_path / "data", "train"))
    with pytest.raises(ConfigError, match="was prepared with"):
        config("data.source=tokens", f"data.path={tmp_path / 'data'}", "model.vocab_size=320")


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    cases = {
        "--val-fraction 0.7 must be in [0, 0.5)": (corpus, ("--val-fraction", "0.7")),
        "--workers 0 and": (corpus, ("--workers", "0")),
        "does not exist": (tmp_path / "missing", ()),
        'bad.jsonl:2 has no string field "text"': (tmp_path / "bad.jsonl", ()),
        "--eos 'ab' is not a single token": (corpus, ("--eos", "ab")),
    }
    for message, (source, extra) in cases.items():
        assert prepare(tmp_path / "out", source, extra=extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "100", "--out", "t.json"]) == 2
    assert "must exceed 256" in capsys.readouterr().err


def test_parquet_without_pyarrow_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert prepare(tmp_path / "out", tmp_path / "d.parquet") == 2
    assert "pip install pyarrow" in capsys.readouterr().err and not (tmp_path / "out").exists()
