"""The whole ``clean`` stage against datatrove, on the same real-text corpus, in the same run.

    python benchmarks/clean_stage.py --datatrove-python /tmp/dt-venv/bin/python

lmcore runs its real stage entry function (``lmcore.data.clean.clean``): reading prepare-style shards,
mojibake repair, NFC, control characters, whitespace, PII redaction, the C4, Gopher quality,
Gopher repetition and FineWeb filters, exact and MinHash de-duplication, the split and the
writer, with 1 and with 2 worker processes. datatrove 0.10.1 runs its four equivalent filters
(no de-duplication: its MinHash needs four more pipeline passes) with tasks=workers=1 and 2. The
corpus is the one of ``clean_vs_datatrove.py`` (Shakespeare scenes and KJV chapters, each in 6
copies with ~3 % of the words edited: 57 MB). Reported: wall seconds and MB/s of each run, peak
RSS (the largest process), and the agreement of the *filter* decisions (a document dropped by
lmcore's de-duplication passed the filters, so it counts as kept by them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("clean_vs_datatrove", HERE / "clean_vs_datatrove.py")
cvd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cvd)

FILTERS = {"c4": {}, "gopher_quality": {}, "gopher_repetition": {}, "fineweb": {}}


def run_lmcore_stage(corpus: Path, work: Path, workers: int) -> dict:
    """Child process: prepare-style shards, then the clean stage; returns seconds and counts."""
    from lmcore.config import CleanConfig, TrackingConfig
    from lmcore.core.io import read_jsonl
    from lmcore.data.clean import clean
    from lmcore.data.prepare import write_shards

    raw = work / "raw"
    if not (raw / "corpus").exists():
        write_shards(read_jsonl(corpus), raw / "corpus", 8 * 2**20)
    cfg = CleanConfig(min_chars=0, filters=FILTERS, write_dropped=True, workers=workers, validation_fraction=0.05)
    t = time.perf_counter()
    res = clean(cfg, raw, work / f"clean-{workers}", work / f"clean-{workers}.json", TrackingConfig(enabled=False))
    return {"seconds": time.perf_counter() - t, "kept": res.stats["documents_kept"], "documents": res.stats["documents_in"],
            "dedup": {k: v for k, v in res.stats.items() if k.startswith("dedup.dropped_docs")}}


def lmcore_filter_decisions(out: Path) -> dict[str, str | None]:
    """id -> None (passed the filters) or "step:reason" (dropped by a filter)."""
    decisions: dict[str, str | None] = {}
    for split in ("train", "validation"):
        for p in (out / split).glob("*.jsonl"):
            for line in p.open(encoding="utf-8"):
                decisions[json.loads(line)["id"]] = None
    for p in (out / "dropped").glob("*.jsonl"):
        for line in p.open(encoding="utf-8"):
            d = json.loads(line)
            decisions[d["id"]] = None if d["drop_step"] == "dedup" else f"{d['drop_step']}:{d['drop_reason']}"
    return decisions


def child(cmd: list[str], log: Path) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as res:
        pass
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, "--result", res.name], stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed; see {log}")
    out = json.loads(Path(res.name).read_text())
    os.unlink(res.name)
    # ru_maxrss of a waited child covers its largest descendant too
    return {**out, "wall": time.perf_counter() - t0, "cpu": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datatrove-python", default="/tmp/dt-venv/bin/python")
    p.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "lmcore-bench" / "corpus.jsonl")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "realtext")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--worker", choices=("lmcore", "datatrove"), help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "lmcore":
        a.result.write_text(json.dumps(run_lmcore_stage(a.corpus, a.work, a.workers)))
        return 0
    if not a.corpus.exists():
        cvd.build_corpus(a.corpus, a.cache)
    mb = a.corpus.stat().st_size / 1e6
    work = a.work or Path(tempfile.mkdtemp(prefix="clean-stage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in (1, 2):
        lm = child([sys.executable, __file__, "--worker", "lmcore", "--workers", str(workers), "--corpus", str(a.corpus),
                    "--work", str(work)], work / f"lmcore-{workers}.log")
        rows.append((f"lmcore clean stage, {workers} process(es)", lm))
        print(rows[-1][0], json.dumps(lm))
        dt_out = work / f"datatrove-{workers}"
        dt = child([a.datatrove_python, str(HERE / "clean_vs_datatrove.py"), "--worker", "datatrove", "--input",
                    str(a.corpus), "--out", str(dt_out)], work / f"datatrove-{workers}.log") if workers == 1 else None
        if dt is not None:
            rows.append(("datatrove 0.10.1, 4 filters, tasks=1 workers=1", dt))
            print(rows[-1][0], json.dumps(dt))
    dtd, _ = cvd._datatrove_decisions(work / "datatrove-1")
    for _, r in rows:
        r.setdefault("kept", sum(v is None for v in dtd.values()))
    lmd = lmcore_filter_decisions(work / "clean-1")
    same = sum(1 for k, v in dtd.items() if (v is None) == (lmd.get(k, "missing") is None))
    disagree = [(k, v, lmd.get(k)) for k, v in dtd.items() if (v is None) != (lmd.get(k, "missing") is None)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    print(f"\n### Clean stage vs datatrove, {datetime.date.today()}, commit {commit}\n")
    from lmcore.core.machine import cpu_name

    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores. Command: "
          f"`python benchmarks/clean_stage.py`. Input: {mb:.1f} MB, {len(dtd)} documents.\n")
    print("| run | wall s | MB/s | CPU s | peak RSS MB | kept |\n|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall']:.1f} | {mb / r['wall']:.2f} | {r['cpu']:.1f} | {r['peak_rss_mb']:.0f} | {r['kept']} |")
    print(f"\nFilter decisions: {100 * same / len(dtd):.2f} % agree ({same} of {len(dtd)}); "
          f"disagreements: {disagree[:10]}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
