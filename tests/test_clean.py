"""The clean stage's pipeline: steps, statistics, determinism, bounded memory, orchestration."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_text

from lmcore.config import CleanConfig, ConfigError, TrackingConfig, flatten, from_dict
from lmcore.data.clean import clean, clean_shard, raw_shards
from lmcore.data.clean.normalizers import (
    ControlCharRemover,
    MojibakeFixer,
    PIIRedactor,
    UnicodeNormalizer,
    WhitespaceNormalizer,
)
from lmcore.data.prepare import write_shards

OFF = TrackingConfig(enabled=False)


def raw_corpus(folder: Path, n_docs: int = 60, shard_bytes: int = 20_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [{"text": make_text(rng, rng.randint(40, 400)), "source": "test", "id": str(i)} for i in range(n_docs)]
    docs[10]["text"] = docs[3]["text"]  # an exact duplicate
    words = docs[5]["text"].split(" ")
    words[7] = "changed"
    docs[20]["text"] = " ".join(words)  # a near duplicate
    docs[30]["text"] = "short"
    docs[40]["text"] = "Write to jane.doe@example.org or 192.168.0.17 now. " + docs[40]["text"]
    write_shards(iter(docs), folder / "corpus", shard_bytes)
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def test_normalisers():
    assert UnicodeNormalizer("NFKC")("ﬁne") == "fine"
    assert ControlCharRemover()("a\u200bb\r\nc\x07") == "ab\nc"
    assert WhitespaceNormalizer()("  x  \n\n\n\ny \t\n") == "x\n\ny"
    assert MojibakeFixer()("cafÃ©") == "café"
    pii = PIIRedactor()
    assert pii("mail a.b@c.org from 10.0.0.1 or fe80:0:0:0:0:0:0:1") == "mail <EMAIL> from <IP_ADDRESS> or <IP_ADDRESS>"
    assert pii.counts == {"emails_replaced": 1, "ipv4_replaced": 1, "ipv6_replaced": 1}
    assert pii("version 1.2.3 and 999.1.1.1") == "version 1.2.3 and 999.1.1.1"
    # compressed IPv6 forms too; not a loopback ::1 nor a slice a[1::2]
    assert pii("from 2001:db8::1, fe80::1ff:fe23:4567:890a; ::1 and a[1::2]") == (
        "from <IP_ADDRESS>, <IP_ADDRESS>; ::1 and a[1::2]")
    # the local part of an address starts where its run of characters starts
    assert pii("x-y.z@example.org and -lead@example.org") == "<EMAIL> and <EMAIL>"
    # zero-width joiners are spelling (Persian, Indic) and emoji sequences: kept
    assert ControlCharRemover()("می‌خواهم 👨‍👩") == (
        "می‌خواهم 👨‍👩")


def test_text_is_in_nfc_after_the_normalisers_and_c4_cuts_are_measured_again(tmp_path):
    """A zero-width space between a letter and its accent was removed after NFC (the text left
    out of NFC); min_chars was checked before C4 removed lines (short or empty documents kept)."""
    import unicodedata

    from lmcore.data.clean.stage import build_steps

    cfg = CleanConfig(min_chars=40, filters={"c4": {}})
    steps = build_steps(cfg)
    text = "cafe\u200b\u0301"
    for kind, step in steps:
        if kind == "normalizer" and step.name != "c4_lines":
            text = step(text)
    assert text == "caf\u00e9" and unicodedata.is_normalized("NFC", text)
    prose = "The keeper climbed the narrow stairs every evening and wrote in his notebook."
    docs = [{"text": f"{prose} Page {i}.\n{prose}", "id": f"kept {i}"} for i in range(8)] + [
        {"text": prose[:30] + ".\n" + "\n".join(f"menu item {i}" for i in range(20)), "id": "cut short"},
        {"text": "\n".join(f"no end punctuation in line {i}" for i in range(5)), "id": "cut to nothing"}]
    write_shards(iter(docs), tmp_path / "raw/corpus", 10**6)
    res = clean(CleanConfig(min_chars=40, validation_fraction=0.5, filters={"c4": {"min_num_sentences": -1}},
                            minhash=None, write_dropped=True, workers=1),
                tmp_path / "raw", tmp_path / "clean", tmp_path / "m.json", OFF)
    kept = [json.loads(line) for p in (tmp_path / "clean").glob("*/0*.jsonl") if "dropped" not in str(p)
            for line in p.read_text().splitlines()]
    assert sorted(d["id"] for d in kept) == [f"kept {i}" for i in range(8)]
    dropped = {json.loads(line)["id"]: json.loads(line)["drop_step"]
               for p in (tmp_path / "clean/dropped").glob("*.jsonl") for line in p.read_text().splitlines()}
    assert dropped == {"cut short": "min_length_after_lines", "cut to nothing": "min_length_after_lines"}
    assert res.stats["min_length_after_lines.dropped_docs.too_short"] == 2


def test_drops_are_counted_per_step_and_reason_and_written_aside(tmp_path):
    raw = raw_corpus(tmp_path / "raw")
    cfg = CleanConfig(min_chars=50, filters={}, write_dropped=True, validation_fraction=0.2, workers=2)
    res = clean(cfg, raw, tmp_path / "clean", tmp_path / "clean.json", OFF)
    s = res.stats
    assert s["documents_in"] == 60 and s["shards"] == len(raw_shards(raw)) > 1
    assert s["min_length.dropped_docs.too_short"] == 1
    assert s["dedup.dropped_docs.exact_duplicate"] == 1
    assert s["dedup.dropped_docs.near_duplicate"] == 1
    assert s["pii.emails_replaced"] == 1 and s["pii.ipv4_replaced"] == 1
    assert s["documents_kept"] == 57 == s["train_documents"] + s["validation_documents"]
    dropped = [json.loads(line) for p in sorted((tmp_path / "clean/dropped").glob("*.jsonl")) for line in p.open()]
    assert sorted(d["drop_reason"] for d in dropped) == ["exact_duplicate", "near_duplicate", "too_short"]
    assert {d["id"] for d in dropped} == {"10", "20", "30"}
    kept = "".join(p.read_text() for p in (tmp_path / "clean").glob("*/0*.jsonl") if "dropped" not in str(p))
    assert "<EMAIL>" in kept and "jane.doe" not in kept
    # the DVC metrics file holds the headline numbers (totals, drops per step and reason); every
    # per-step count and timing stays in the stage's own statistics file
    headline = json.loads((tmp_path / "clean.json").read_text())
    assert headline["documents_kept"] == 57 and headline["min_length.dropped_docs.too_short"] == 1
    assert headline["dedup.dropped_docs.near_duplicate"] == 1 and len(headline) <= 16, sorted(headline)
    assert not [k for k in headline if k.endswith((".seconds", ".docs_in")) or ".dropped_chars." in k]
    stats = json.loads((tmp_path / "clean/stats.json").read_text())
    assert stats == s and "pii.seconds" in stats and stats["mb_per_second"] > 0  # the speed too


def test_output_does_not_depend_on_workers_or_orchestrator(tmp_path):
    raw = raw_corpus(tmp_path / "raw", n_docs=80, shard_bytes=8_000)
    base = CleanConfig(min_chars=50, filters={}, write_dropped=True)
    clean(base.model_copy(update={"workers": 1}), raw, tmp_path / "a", tmp_path / "a.json", OFF)
    clean(base.model_copy(update={"workers": 3}), raw, tmp_path / "b", tmp_path / "b.json", OFF)
    in_reverse = lambda jobs: [clean_shard(*j) for j in reversed(jobs)]  # noqa: E731 - any order, any worker
    clean(base, raw, tmp_path / "c", tmp_path / "c.json", OFF, map_shards=in_reverse)
    a = outputs(tmp_path / "a")
    assert len(a) > 6 and a == outputs(tmp_path / "b") == outputs(tmp_path / "c")


def test_a_failed_clean_leaves_no_scratch_folder_and_keeps_the_earlier_output(tmp_path):
    from lmcore.core.errors import StageError
    from lmcore.data.clean.stage import work_dir

    raw = raw_corpus(tmp_path / "raw", n_docs=80, shard_bytes=8_000)
    cfg = CleanConfig(min_chars=50, filters={}, workers=1)
    clean(cfg, raw, tmp_path / "clean", tmp_path / "clean.json", OFF)
    before = outputs(tmp_path / "clean")

    def worker_lost(jobs):  # an orchestrator whose worker dies after the first shard
        clean_shard(*jobs[0])
        assert work_dir(tmp_path / "clean").is_dir()
        raise StageError("worker lost")

    with pytest.raises(StageError, match="worker lost"):
        clean(cfg, raw, tmp_path / "clean", tmp_path / "clean.json", OFF, map_shards=worker_lost)
    assert not work_dir(tmp_path / "clean").exists()  # the first shards' scratch files went too
    assert outputs(tmp_path / "clean") == before


def test_bad_filter_settings_name_the_key():
    with pytest.raises(ConfigError, match="clean.*filters.gopher_quality.*unknown field"):
        from_dict({"clean": {"filters": {"gopher_quality": {"no_such_threshold": 1}}}})
    with pytest.raises(ConfigError, match="unknown filter 'perplexity'"):
        from_dict({"clean": {"filters": {"perplexity": {}}}})
    with pytest.raises(ConfigError, match="minhash"):
        from_dict({"clean": {"minhash": {"bands": 3, "rows": 5, "num_perm": 16}}})
    with pytest.raises(ConfigError, match=r"filters.gopher_quality: min_doc_words = 'many' is invalid"):
        from_dict({"clean": {"filters": {"gopher_quality": {"min_doc_words": "many"}}}})
    with pytest.raises(ConfigError, match=r"minhash: unknown field\(s\) \['buckets'\]; allowed: \['shingle_size'"):
        from_dict({"clean": {"minhash": {"buckets": 14}}})
    with pytest.raises(ConfigError, match="filters.fineweb: unknown field.*allowed: .*line_punct_thr"):
        from_dict({"clean": {"filters": {"fineweb": {"min_num_sentences": 3}}}})
    with pytest.raises(ConfigError, match=r"filters.language: threshold = 65 is invalid \(Input should be less than or equal to 1"):
        from_dict({"clean": {"filters": {"language": {"threshold": 65}}}})  # a per cent, not a probability
    with pytest.raises(ConfigError, match=r"filters.fineweb: stop_chars = \[\] is invalid"):
        from_dict({"clean": {"filters": {"fineweb": {"stop_chars": []}}}})  # dropped every document
    with pytest.raises(ConfigError, match=r"filters.gopher_quality: by_language \(fr\) needs thresholds: per_language"):
        from_dict({"clean": {"filters": {"gopher_quality": {"thresholds": "english",
                                                            "by_language": {"fr": {"min_doc_words": 9}}}}}})


def test_filter_and_minhash_settings_are_typed_sections():
    from lmcore.config import C4Settings, GopherQualitySettings, LanguageSettings, MinHashConfig
    from lmcore.data.clean import filters as F
    from lmcore.data.clean.dedup import MinHashConfig as DedupMinHash
    from lmcore.data.clean.stage import MinLengthAfterFilter, build_steps, minhash_config

    cfg = from_dict({"clean": {"filters": {"language": {"languages": "fr"}, "c4": None,
                                           "gopher_quality": {"min_doc_words": 20, "stop_words": ["the", "a"]}},
                               "minhash": {"bands": 14, "rows": 8}}}).clean
    assert list(cfg.filters) == ["language", "c4", "gopher_quality"]  # the order given
    assert cfg.filters["c4"] == C4Settings() and type(cfg.filters["c4"]) is C4Settings
    assert cfg.filters["language"] == LanguageSettings(languages=("fr",))
    assert cfg.filters["gopher_quality"].stop_words == ("the", "a")
    assert cfg.minhash == MinHashConfig(bands=14, rows=8) and DedupMinHash is MinHashConfig
    assert minhash_config(cfg) is cfg.minhash
    assert from_dict({"clean": {"minhash": None}}).clean.minhash is None
    assert CleanConfig().minhash == MinHashConfig() == from_dict({"clean": {"minhash": {}}}).clean.minhash
    steps = [s for _, s in build_steps(cfg)][-5:]
    assert [type(s) for s in steps] == [F.LanguageFilter, F.C4LineCleaner, F.C4QualityFilter, F.GopherQualityFilter,
                                        MinLengthAfterFilter]  # C4 removed lines: min_chars once more
    assert steps[0].languages == ("fr",) and steps[3].min_doc_words == 20 and steps[3].stop_words == ("the", "a")
    # each default is written once: the filter classes are their settings sections
    for cls, section in [(F.GopherQualityFilter, GopherQualitySettings), (F.C4LineCleaner, C4Settings),
                         (F.C4QualityFilter, C4Settings), (F.LanguageFilter, LanguageSettings)]:
        assert issubclass(cls, section)
        assert {k: getattr(cls(), k) for k in section.__pydantic_fields__} == vars(section())
    assert F.GopherQualityFilter().min_doc_words == GopherQualitySettings().min_doc_words == 50
    with pytest.raises(ValueError, match="min_doc_words"):
        F.GopherQualityFilter(min_doc_words=-3)  # validated like params.yaml
    # flattened for MLflow: JSON data, the sections walked
    flat = flatten(cfg, "clean.")
    assert flat["clean.filters"]["gopher_quality"]["stop_words"] == ["the", "a"]
    assert flat["clean.minhash.bands"] == 14
    json.dumps(flat)


MEMORY_SCRIPT = textwrap.dedent('''
    import json, random, resource, sys
    from pathlib import Path
    from lmcore.data.clean import clean
    from lmcore.config import CleanConfig, TrackingConfig
    root = Path(sys.argv[1]); mb = int(sys.argv[2]); headroom_mb = int(sys.argv[3])
    cfg = CleanConfig(min_chars=10, filters={}, workers=1, validation_fraction=0.1)
    off = TrackingConfig(enabled=False)
    def vm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    # warm up every import (report, dedup, ftfy) on a small corpus
    (root / "small/corpus").mkdir(parents=True)
    rng = random.Random(0)
    words = [''.join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    def doc(i):
        return json.dumps({"text": " ".join(rng.choice(words) for _ in range(900)) + f" {i}."}) + "\\n"
    (root / "small/corpus/00000.jsonl").write_text("".join(doc(i) for i in range(50)))
    clean(cfg, root / "small", root / "small_out", root / "m1.json", off)
    (root / "big/corpus").mkdir(parents=True)
    with open(root / "big/corpus/00000.jsonl", "w") as f:
        i = 0
        while f.tell() < mb * 2**20:
            f.write(doc(i)); i += 1
    limit = vm() + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    res = clean(cfg, root / "big", root / "big_out", root / "m2.json", off)
    print(json.dumps({"docs": res.stats["documents_in"], "kept": res.stats["documents_kept"]}))
''')


def test_memory_stays_bounded_on_a_corpus_larger_than_the_allowed_memory(tmp_path):
    """A 36 MB corpus cleaned under an address-space cap of 24 MB above the warmed-up process."""
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), "36", "24"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["docs"] > 6_000 and out["kept"] > 0.99 * out["docs"]
