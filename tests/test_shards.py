"""The encode stage's token shards and the TokenShards view that pretrain and evaluate read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenizer import corpus, write_clean

from lmcore.config import EncodeConfig, TokenizerConfig, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import sha256_file
from lmcore.data.encode import dtype_for, encode, load_manifest, load_tokens, plan_workers
from lmcore.data.shards import TokenShards
from lmcore.data.tokenizer import load as load_tok
from lmcore.data.tokenizer import train_tokenizer
from lmcore.eval.unigram import unigram_nll
from lmcore.eval.windows import sliding_window_nll
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.train.pretrain import WindowSampler, fixed_windows

OFF = TrackingConfig(enabled=False)


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Clean data in 3 train shards (one of them empty) and 1 validation shard, and a tokenizer.
    One document holds the literal end-of-text string."""
    tmp = tmp_path_factory.mktemp("shards")
    train = corpus(23)
    train[4] = "He wrote <|endoftext|> in the middle of a line. " + train[4]
    clean = write_clean(tmp / "clean", train, corpus(6, seed=1), train_shards=3)
    (clean / "train/00001.jsonl").write_text("")  # an empty input shard gives an empty token shard
    train_tokenizer(TokenizerConfig(vocab_size=400), clean, tmp / "tok", tmp / "m/t.json", OFF)
    encode(EncodeConfig(batch_size=3, workers=1), clean, tmp / "tok", tmp / "tokens", tmp / "m/e.json", OFF)
    return tmp


def test_encode_matches_tokenizer_and_manifest(project):
    tmp = project
    tok = load_tok(tmp / "tok")
    manifest = load_manifest(tmp / "tokens")
    eot = manifest["eot_id"]
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400 and eot == 0
    assert manifest["tokenizer_sha256"] == sha256_file(tmp / "tok/tokenizer.json")
    for split in ("train", "validation"):
        sources = sorted((tmp / "clean" / split).glob("*.jsonl"))
        docs = [d for s in sources for d in read_texts(s)]
        expected = [i for d in docs for i in tok.encode(d).ids + [eot]]
        arr = load_tokens(tmp / "tokens", split)
        assert isinstance(arr, TokenShards) and arr.dtype == np.uint16 and len(arr) == len(expected)
        assert arr.tolist() == expected and np.asarray(arr).tolist() == expected
        info = manifest["splits"][split]
        assert info["tokens"] == len(expected) and info["documents"] == len(docs)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert info["sources"] == {f"{split}/{s.name}": sha256_file(s) for s in sources}
        assert [e["source"] for e in info["shards"]] == [f"{split}/{s.name}" for s in sources]
        # the only end-of-text tokens are the ones closing each document
        assert int((np.asarray(arr) == eot).sum()) == len(docs) == arr.n_documents
    names = [e["file"] for e in manifest["splits"]["train"]["shards"]]
    assert names == ["train-00000-of-00003.bin", "train-00001-of-00003.bin", "train-00002-of-00003.bin"]
    assert manifest["splits"]["train"]["shards"][1]["tokens"] == 0
    assert [e["file"] for e in manifest["splits"]["validation"]["shards"]] == ["validation.bin"]
    metrics = json.loads((tmp / "m/e.json").read_text())
    assert metrics["train_tokens"] == manifest["splits"]["train"]["tokens"]


def test_documents_through_the_index(project):
    tmp = project
    tok = load_tok(tmp / "tok")
    tok.encode_special_tokens = True
    docs = [d for s in sorted((tmp / "clean/train").glob("*.jsonl")) for d in read_texts(s)]
    arr = load_tokens(tmp / "tokens", "train")
    assert arr.n_documents == len(docs)
    for i, d in enumerate(docs):
        assert arr.document(i).tolist() == tok.encode(d).ids
        assert tok.decode(arr.document(i).tolist(), skip_special_tokens=False) == d
    assert arr.document(-1).tolist() == tok.encode(docs[-1]).ids
    with pytest.raises(IndexError):
        arr.document(len(docs))
    # the .idx files: uint64 document starts plus the shard's token count
    entry = load_manifest(tmp / "tokens")["splits"]["train"]["shards"][0]
    idx = np.fromfile(tmp / "tokens" / entry["index"], dtype="<u8")
    assert len(idx) == entry["documents"] + 1 and idx[0] == 0 and idx[-1] == entry["tokens"]
    # the .bytes files: each document's UTF-8 bytes, as read
    sizes = np.fromfile(tmp / "tokens" / entry["document_bytes"], dtype="<u8")
    first = read_texts(sorted((tmp / "clean/train").glob("*.jsonl"))[0])
    assert sizes.tolist() == [len(d.encode("utf-8")) for d in first] and int(sizes.sum()) == entry["bytes"]
    assert arr.bytes_of_first(len(docs)) == sum(len(d.encode("utf-8")) for d in docs)
    assert arr.bytes_of_first(0) == 0 and arr.bytes_of_first(3) == sum(len(d.encode("utf-8")) for d in docs[:3])


def test_a_tokenizer_trained_again_at_the_same_path_is_the_one_encode_uses(project, tmp_path):
    """Encode kept each process's tokenizer by path: in one process (a Prefect flow, a notebook) a
    tokenizer trained again at the same path was ignored, and the shards held the old ids under a
    manifest naming the new tokenizer."""
    clean = project / "clean"
    for vocab in (300, 420):
        train_tokenizer(TokenizerConfig(vocab_size=vocab), clean, tmp_path / "tok", tmp_path / "m/t.json", OFF)
        encode(EncodeConfig(workers=1), clean, tmp_path / "tok", tmp_path / f"tokens{vocab}", tmp_path / "m/e.json", OFF)
    tok = load_tok(tmp_path / "tok")
    docs = [d for s in sorted((clean / "validation").glob("*.jsonl")) for d in read_texts(s)]
    arr = load_tokens(tmp_path / "tokens420", "validation")
    assert arr.document(0).tolist() == tok.encode(docs[0]).ids
    assert load_tokens(tmp_path / "tokens300", "validation").document(0).tolist() != arr.document(0).tolist()


def test_output_is_identical_whatever_the_worker_count(project, tmp_path):
    tmp = project

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    reference = files(tmp / "tokens")
    for i, cfg in enumerate([EncodeConfig(batch_size=2, workers=3),  # forked single-threaded workers
                             EncodeConfig(batch_size=5, workers=2, threads=2)]):  # spawned, two threads each
        encode(cfg, tmp / "clean", tmp / "tok", tmp_path / f"t{i}", tmp_path / f"m{i}.json", OFF)
        assert files(tmp_path / f"t{i}") == reference


def test_worker_plan():
    sizes = [10, 10, 10, 10]
    assert plan_workers(EncodeConfig(), sizes, cores=2) == (2, 1)
    assert plan_workers(EncodeConfig(), [100, 10, 10], cores=2) == (1, None)  # one shard dominates
    assert plan_workers(EncodeConfig(), [10], cores=8) == (1, None)
    assert plan_workers(EncodeConfig(), sizes, cores=1) == (1, None)
    assert plan_workers(EncodeConfig(), sizes, cores=8) == (4, 2)
    assert plan_workers(EncodeConfig(workers=3, threads=2), sizes, cores=2) == (3, 2)
    assert plan_workers(EncodeConfig(workers=9), sizes, cores=2) == (4, 1)


def test_reading_is_memory_mapped_without_copies(project):
    val = load_tokens(project / "tokens", "validation")
    (shard,) = val.shards
    assert isinstance(shard, np.memmap) and not shard.flags.writeable
    assert np.shares_memory(val[5:50], shard)
    assert np.shares_memory(np.asarray(val), shard)
    train = load_tokens(project / "tokens", "train")
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(train, copy=False)


def test_dtype_follows_the_vocabulary():
    assert dtype_for(400) == np.uint16 and dtype_for(2**16) == np.uint16 and dtype_for(2**16 + 1) == np.uint32


def test_damaged_or_missing_shards_are_reported(project, tmp_path):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(project / "tokens", tokens)
    with pytest.raises(StageError, match="no split 'test'"):
        load_tokens(tokens, "test")
    path = tokens / "validation.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"\xff\xff")  # the same size, the last token id 65535
    with pytest.raises(StageError, match=r"validation\.bin: token id 65535 is outside the vocabulary of \d+"):
        load_tokens(tokens, "validation")
    path.write_bytes(data[:-2])
    with pytest.raises(StageError, match=r"validation\.bin: .* bytes, but manifest\.json says"):
        load_tokens(tokens, "validation")
    path.unlink()
    with pytest.raises(StageError, match=r"validation\.bin: tokens not found"):
        load_tokens(tokens, "validation")


@pytest.mark.parametrize("damage, message", [
    (lambda m: [], "the top level: Input should be a valid dictionary, not []"),
    (lambda m: m.pop("tokenizer_sha256") and m, "tokenizer_sha256: missing"),
    (lambda m: m["splits"]["train"]["shards"][0].update(tokens="x") or m,
     "splits.train.shards.0.tokens: Input should be a valid integer, not 'x'"),
    (lambda m: m.update(dtype="foo") or m, "dtype: Input should be 'uint16' or 'uint32', not 'foo'"),
])
def test_a_damaged_manifest_names_the_key(project, tmp_path, damage, message):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(project / "tokens", tokens)
    manifest = json.loads((tokens / "manifest.json").read_text())
    (tokens / "manifest.json").write_text(json.dumps(damage(manifest)))
    with pytest.raises(StageError) as e:
        load_tokens(tokens, "train")
    assert str(e.value) == f"{tokens / 'manifest.json'}: {message}; re-run the encode stage"


def test_bad_clean_line_names_file_and_line(tmp_path, project):
    clean = write_clean(tmp_path / "clean", corpus(4), corpus(2))
    with open(clean / "train/00000.jsonl", "a") as f:
        f.write('{"text": 5}\n')
    for workers in (1, 2):
        with pytest.raises(StageError, match=r"train/00000\.jsonl: line 5: expected a JSON object with a string"):
            encode(EncodeConfig(workers=workers), clean, project / "tok", tmp_path / "tokens", tmp_path / "m.json", OFF)
        assert not (tmp_path / "tokens").exists()


# ------------------------------------------------------------------------------------------ TokenShards


@pytest.fixture
def synthetic() -> tuple[TokenShards, np.ndarray]:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (7, 0, 1, 12, 0, 5)]
    return TokenShards(parts), np.concatenate(parts)


def test_slices_across_shard_boundaries(synthetic):
    view, flat = synthetic
    n = len(flat)
    assert len(view) == n == 25 and view.shape == (25,) and view.dtype == np.uint16
    for start in range(-3, n + 2):
        for stop in range(-3, n + 2):
            got = view[start:stop]
            assert isinstance(got, np.ndarray) and got.dtype == np.uint16
            assert np.array_equal(got, flat[start:stop]), (start, stop)
    for key in (slice(None, None, 3), slice(2, 20, 4), slice(None, None, -1), slice(20, 3, -2), slice(None)):
        assert np.array_equal(view[key], flat[key]), key
    # numpy integers as bounds (what train_batch passes)
    s = np.int64(6)
    assert np.array_equal(view[s : s + 3], flat[6:9])


def test_integer_and_array_indexing(synthetic):
    view, flat = synthetic
    for i in range(-len(flat), len(flat)):
        assert view[i] == flat[i]
    with pytest.raises(IndexError):
        view[len(flat)]
    with pytest.raises(IndexError):
        view[-len(flat) - 1]
    idx = np.array([0, 24, 7, 8, -1, 3])
    assert np.array_equal(view[idx], flat[idx])
    with pytest.raises(TypeError):
        view["a"]


def test_array_protocol(synthetic):
    view, flat = synthetic
    assert np.array_equal(np.asarray(view), flat)
    assert np.asarray(view, dtype=np.int64).dtype == np.int64
    assert np.array_equal(np.bincount(np.asarray(view, dtype=np.int64)), np.bincount(flat.astype(np.int64)))
    assert list(view) == flat.tolist()
    empty = TokenShards([np.empty(0, np.uint32)])
    assert len(empty) == 0 and np.asarray(empty).dtype == np.uint32 and len(empty[0:10]) == 0


def test_documents_from_synthetic_index():
    shards = [np.array([5, 6, 0, 7, 0], np.uint16), np.array([], np.uint16), np.array([8, 8, 8, 0], np.uint16)]
    indexes = [np.array([0, 3, 5], np.uint64), np.array([0], np.uint64), np.array([0, 4], np.uint64)]
    view = TokenShards(shards, indexes)
    assert view.n_documents == 3
    assert [view.document(i).tolist() for i in range(3)] == [[5, 6], [7], [8, 8, 8]]
    assert [d.tolist() for d in view.documents()] == [[5, 6], [7], [8, 8, 8]]
    with pytest.raises(StageError, match="without their .idx"):
        TokenShards(shards).document(0)


def test_pretrain_and_evaluate_read_token_shards_like_an_array(synthetic):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 50, size=n).astype(np.uint16) for n in (30, 11, 0, 40)]
    view, flat = TokenShards(parts), np.concatenate(parts)
    a, b = WindowSampler(len(view), 8, seed=3), WindowSampler(len(flat), 8, seed=3)
    for _ in range(4):  # windows across shard boundaries and epochs
        assert np.array_equal(a.next_step(view, 5), b.next_step(flat, 5))
    assert torch.equal(fixed_windows(view, 5, 8), fixed_windows(flat, 5, 8))
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    a = sliding_window_nll(model, view, 8, 5, batch_size=3, max_tokens=60)
    b = sliding_window_nll(model, flat, 8, 5, batch_size=3, max_tokens=60)
    assert a[1] == b[1] and math.isclose(a[0], b[0], rel_tol=1e-6)
    assert unigram_nll(view, view[:40], 50) == unigram_nll(flat, flat[:40], 50)


def test_a_uint32_split_reads_back_ids_above_65535(tmp_path):
    """A vocabulary above 65,536 tokens is stored as uint32: the reader must take the manifest's
    dtype (as uint16 these ids would wrap)."""
    ids = np.array([65_535, 65_536, 70_259, 0, 1, 0], dtype=np.uint32)  # two documents, each ending in 0
    ids.tofile(tmp_path / "train.bin")
    np.array([0, 4, 6], dtype="<u8").tofile(tmp_path / "train.idx")
    shard = {"file": "train.bin", "index": "train.idx", "source": "s", "source_sha256": "0", "tokens": 6,
             "documents": 2, "bytes": 12}
    manifest = {"format": 1, "dtype": "uint32", "index_dtype": "uint64", "vocab_size": 70_260, "eot_id": 0,
                "tokenizer_sha256": "x",
                "splits": {"train": {"tokens": 6, "documents": 2, "bytes": 12, "sources": {}, "shards": [shard]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tokens = load_tokens(tmp_path, "train")
    assert np.asarray(tokens).dtype == np.uint32 and np.asarray(tokens).tolist() == ids.tolist()
    assert tokens.document(0).tolist() == [65_535, 65_536, 70_259] and tokens[1:5].tolist() == [65_536, 70_259, 0, 1]
