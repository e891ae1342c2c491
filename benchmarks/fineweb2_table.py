"""Generate ``lmcore/data/clean/fineweb2.json``: FineWeb-2's per-language filter settings, keyed
by the language codes py3langid 0.4.0 gives.

FineWeb-2 (https://github.com/huggingface/fineweb-2) filters each language with datatrove's
``GopherRepetitionFilter``, ``FineWebQualityFilter`` and ``GopherQualityFilter``. A few arguments
are the same for every language (``fineweb-2-pipeline.py``). The rest come from one flat YAML per
language, ``configs/<iso639-3>_<Script>.yml``. This script:

1. reads every config, the pipeline script and ``fineweb2-language-distribution.csv`` (documents
   per config) from the fineweb-2 repository, and ``src/datatrove/assets/tokenizer_assignment.csv``
   and the three filters' sources from the datatrove repository;
2. maps each of py3langid's 140 codes (:data:`PY3LANGID_CODES`, from ``lmcore.core.languages``,
   so that py3langid is not needed) to one config with the rules of :func:`map_code`, and records the rule in ``mapped_by``;
3. takes the pipeline's fixed filter arguments (``_meta.pipeline_constants``), the config key ->
   filter argument map (``_meta.key_map``) and datatrove's defaults for the arguments FineWeb-2
   leaves alone (``_meta.datatrove_defaults``) from the Python sources with ``ast``, and checks
   that every config has exactly the keys the pipeline reads;
4. writes the JSON (sorted keys, UTF-8, one-space indent). The values are the YAML's, unchanged.

Each repository is given as a bare git directory (read with ``git show HEAD:<path>``, as the
``fetch`` tool's mirrors under ``/work/.mirror/<owner>+<name>/repo``) or as a checkout folder
(files read from disk). Rerun from the repository root with::

    python benchmarks/fineweb2_table.py \\
        --fineweb2 /work/.mirror/huggingface+fineweb-2/repo \\
        --datatrove /work/.mirror/huggingface+datatrove/repo \\
        --out lmcore/data/clean/fineweb2.json

Needs Python 3.11, PyYAML and this checkout's ``lmcore/core/languages.py`` (plain data). ``git`` is needed only for bare git
directories (and to record a checkout's commit).
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore.core.languages import LANGUAGE_CODES  # noqa: E402  (plain data: imports nothing heavy)

PY3LANGID_CODES = tuple(sorted(LANGUAGE_CODES))
"""py3langid 0.4.0's classes (tests/test_multilingual.py checks the list against the model)."""

# Codes the tokenizer_assignment.csv rules would map wrongly or not at all. Each was checked by
# running py3langid 0.4.0 on sample text (see the reasons).
OVERRIDES: dict[str, tuple[str, str]] = {
    "no": ("nob_Latn", "override: macrolanguage no (nor) has no config; Norwegian Bokmål (nob, datatrove "
                       "code_1 'nb') is the written standard py3langid's 'no' stands for (nn is its own code)"),
    "tl": ("fil_Latn", "override: tokenizer_assignment.csv has no code_1 'tl' and fineweb-2 has no tgl config; "
                       "Filipino (fil, standardised Tagalog, datatrove tok_code 'tl')"),
    "ku": ("kmr_Latn", "override: datatrove's default_code_1 for 'ku' is ckb_Arab (Sorani), but py3langid's 'ku' "
                       "is Northern Kurdish in Latin script (Kurmanji); Sorani in Arabic script comes out as 'sdh'"),
    "gom": ("gom_Deva", "override: datatrove's default_script for gom is Latn, but py3langid recognises Konkani "
                        "in Devanagari (Romi Konkani is not identified as gom) and gom_Deva has more documents"),
    "qu": ("quy_Latn", "override: macrolanguage qu (que) has no config; datatrove's default_code_1 is quh_Latn "
                       "(117 documents); Ayacucho Quechua quy_Latn has the most documents of the 27 Quechua "
                       "configs (Southern Quechua, as in Wikipedia's 'qu')"),
}

NO_CONFIG_NOTES = {
    "en": "FineWeb-2 has no eng_Latn config (English was processed by FineWeb v1): 'en' is absent; "
          "English keeps Gopher's/FineWeb's own values (datatrove's defaults, _meta.datatrove_defaults).",
    "zxx": "no linguistic content: no config.",
}

# datatrove filter class -> lmcore's filter name (``clean.filters.<name>``, lmcore.data.clean.fineweb2.FILTERS)
FILTERS = {
    "GopherQualityFilter": ("gopher_quality", "src/datatrove/pipeline/filters/gopher_quality_filter.py"),
    "GopherRepetitionFilter": ("gopher_repetition", "src/datatrove/pipeline/filters/gopher_repetition_filter.py"),
    "FineWebQualityFilter": ("fineweb", "src/datatrove/pipeline/filters/fineweb_quality_filter.py"),
}
CONFIG_DICT = "filter_config"  # the name fineweb-2-pipeline.py gives the loaded YAML


# ---------------------------------------------------------------------------------------------
# reading a repository


class Repo:
    """Files of a repository: a bare git directory (read at HEAD) or a checkout folder."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.bare = (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()
        if not self.bare and not self.path.is_dir():
            sys.exit(f"{path}: neither a bare git directory nor a folder")

    def _git(self, *args: str) -> str:
        where = ["--git-dir", str(self.path)] if self.bare else ["-C", str(self.path)]
        return subprocess.run(["git", *where, *args], check=True, capture_output=True).stdout.decode("utf-8")

    def commit(self) -> str:
        try:
            top = None if self.bare else Path(self._git("rev-parse", "--show-toplevel").strip())
            if top is not None and top.resolve() != self.path.resolve():
                return "unknown (folder is not the top of a git checkout)"
            return self._git("rev-parse", "HEAD").strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown (not a git checkout)"

    def read(self, path: str) -> str:
        if self.bare:
            return self._git("show", f"HEAD:{path}")
        return (self.path / path).read_text(encoding="utf-8")

    def list(self, folder: str) -> list[str]:
        """File names directly in ``folder``."""
        if self.bare:
            return [os.path.basename(p) for p in self._git("ls-tree", "--name-only", f"HEAD:{folder}").split()]
        return sorted(p.name for p in (self.path / folder).iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------
# the Python sources: pipeline arguments and datatrove defaults


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _call_name(node: ast.Call) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _config_key(node: ast.AST) -> str | None:
    """``filter_config["x"]`` -> ``"x"``."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == CONFIG_DICT
            and isinstance(node.slice, ast.Constant)):
        return node.slice.value
    return None


def pipeline_arguments(source: str) -> tuple[dict, dict, dict]:
    """From ``fineweb-2-pipeline.py``: (fixed literal arguments per lmcore filter name,
    config key -> what it sets, other literal calls worth recording (GlotLID, MinHash))."""
    constants: dict[str, dict] = {}
    key_map: dict[str, str] = {}
    other: dict[str, dict] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name in FILTERS:
            target = constants.setdefault(FILTERS[name][0], {})
            for kw in node.keywords:
                key = _config_key(kw.value)
                if key is not None:
                    key_map[key] = f"{name}({kw.arg}=)"
                elif kw.arg not in ("language", "exclusion_writer"):
                    target[kw.arg] = _jsonable(ast.literal_eval(kw.value))
        elif name == "LambdaFilter":
            for sub in ast.walk(node):
                key = _config_key(sub)
                if key is not None:
                    key_map[key] = ("LambdaFilter: keep a document if doc.metadata['language_score'] >= value "
                                    "(GlotLID's score, not py3langid's)")
        elif name == "LanguageFilter" and any(kw.arg == "backend" for kw in node.keywords):
            other["LanguageFilter"] = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        elif name == "MinhashConfig" and len(node.keywords) > 1:
            other["MinhashConfig"] = _literal_kwargs(node)
    return constants, key_map, other


def _literal_kwargs(node: ast.Call) -> dict:
    out = {}
    for kw in node.keywords:
        out[kw.arg] = _literal_kwargs(kw.value) if isinstance(kw.value, ast.Call) else ast.literal_eval(kw.value)
    return out


def init_defaults(source: str, class_name: str) -> dict[str, Any]:
    """The literal defaults of ``class_name.__init__`` (language and exclusion_writer left out)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            args = init.args.args[1:]
            defaults = dict(zip([a.arg for a in args[len(args) - len(init.args.defaults):]], init.args.defaults))
            return {k: _jsonable(ast.literal_eval(v)) for k, v in defaults.items()
                    if k not in ("language", "exclusion_writer")}
    raise SystemExit(f"class {class_name} not found")


# ---------------------------------------------------------------------------------------------
# mapping py3langid codes to configs


def _true(cell: str) -> bool:
    # the CSV writes booleans as TRUE/FALSE strings (both truthy as plain str)
    return cell.strip().upper() == "TRUE"


def map_code(code: str, rows: list[dict], configs: set[str], docs: dict[str, int]) -> tuple[str, str] | None:
    """``(config, rule)`` for a py3langid code, or None. In order:

    1. :data:`OVERRIDES`;
    2. a 3-letter code: the configs ``<code>_<Script>``; with several scripts, the one
       tokenizer_assignment.csv marks ``default_script``;
    3. a 2-letter code: the tokenizer_assignment.csv rows with ``code_1 == code`` that have a config;
       the row marked both ``default_code_1`` and ``default_script`` (for a macrolanguage, the
       individual language datatrove treats as the code's default, e.g. zh -> cmn);
    4. otherwise, among the candidates of 2 or 3, the config with the most documents.
    """
    if code in OVERRIDES:
        config, rule = OVERRIDES[code]
        if config not in configs:
            raise SystemExit(f"override {code} -> {config}: no such config")
        return config, rule
    if len(code) == 3:
        cands = [r for r in rows if r["code_3"] == code and r["key"] in configs]
        label = f"code_3 '{code}'"
        pick = [r for r in cands if _true(r["default_script"])] if len(cands) > 1 else cands
        how = "datatrove default_script" if len(cands) > 1 else "only config"
    else:
        cands = [r for r in rows if r["code_1"] == code and r["key"] in configs]
        label = f"code_1 '{code}'"
        pick = [r for r in cands if _true(r["default_code_1"]) and _true(r["default_script"])]
        how = "datatrove default_code_1 + default_script"
    if not cands:
        return None
    cands = list({r["key"]: r for r in reversed(cands)}.values())[::-1]  # one row per config, first kept
    pick = list({r["key"]: r for r in reversed(pick)}.values())[::-1]
    if len(pick) != 1:
        pick = sorted(cands, key=lambda r: -docs.get(r["key"], 0))[:1]
        how = f"most documents ({docs.get(pick[0]['key'], 0)})"
    row = pick[0]
    code3s = sorted({r["code_3"] for r in rows if r["code_1"] == code})  # with or without a config
    if len(code) == 2 and len(code3s) > 1:
        how = f"macrolanguage/shared code_1 -> {row['code_3']} ({row['name']}), {how}"
    elif len(code) == 2:
        how = f"-> {row['code_3']}, {how}"
    return row["key"], f"tokenizer_assignment.csv {label} {how}"


def alternatives(code: str, chosen: str, rows: list[dict], configs: set[str], docs: dict[str, int]) -> list[str]:
    """Other configs sharing the code (as code_1 or code_3) or the chosen language, most documents first."""
    col = "code_3" if len(code) == 3 else "code_1"
    keys = {r["key"] for r in rows if r[col] == code or r["code_3"] == chosen.split("_")[0]}
    return sorted((keys & configs) - {chosen}, key=lambda k: (-docs.get(k, 0), k))


# ---------------------------------------------------------------------------------------------


def entry(config: dict) -> dict:
    """One language's values, grouped by lmcore filter name, as in the YAML."""
    return {
        "language_score": config["language_score"],
        "gopher_quality": {
            "min_avg_word_length": config["min_avg_word_length"],
            "max_avg_word_length": config["max_avg_word_length"],
            "max_non_alpha_words_ratio": config["max_non_alpha_words_ratio"],
            "stop_words": config["stopwords"],
        },
        "gopher_repetition": {
            "dup_line_frac": config["dup_line_frac"],
            "top_n_grams": config["top_n_grams"],
            "dup_n_grams": config["dup_n_grams"],
        },
        "fineweb": {"line_punct_thr": config["line_punct_thr"], "new_line_ratio": config["new_line_ratio"]},
    }


def build(fw: Repo, dt: Repo, date: str) -> dict:
    fw_commit, dt_commit = fw.commit(), dt.commit()
    configs = {n[: -len(".yml")] for n in fw.list("configs") if n.endswith(".yml")}

    rows = list(csv.DictReader(io.StringIO(dt.read("src/datatrove/assets/tokenizer_assignment.csv"))))
    for r in rows:
        r["key"] = f"{r['code_3']}_{r['script']}"
    docs = {}
    for r in csv.DictReader(io.StringIO(fw.read("fineweb2-language-distribution.csv"))):
        if r["split"] == "train" and r["subset"] in configs and r["documents"].isdigit():
            docs[r["subset"]] = int(r["documents"])

    constants, key_map, other = pipeline_arguments(fw.read("fineweb-2-pipeline.py"))
    defaults = {}  # the arguments the pipeline neither fixes nor takes from the config
    for cls, (name, path) in FILTERS.items():
        from_config = {m[len(cls) + 1: m.index("=)")] for m in key_map.values() if m.startswith(f"{cls}(")}
        defaults[name] = {k: v for k, v in init_defaults(dt.read(path), cls).items()
                          if k not in constants.get(name, {}) and k not in from_config}

    out: dict[str, Any] = {}
    unmapped = []
    for code in PY3LANGID_CODES:
        mapped = None if code in NO_CONFIG_NOTES else map_code(code, rows, configs, docs)
        if mapped is None:
            unmapped.append(code)
            continue
        key, rule = mapped
        config = yaml.safe_load(fw.read(f"configs/{key}.yml"))
        if set(config) != set(key_map):
            raise SystemExit(f"configs/{key}.yml: keys {sorted(config)} != the pipeline's {sorted(key_map)}")
        out[code] = {"fineweb2": key, "mapped_by": rule, **entry(config)}
        alts = alternatives(code, key, rows, configs, docs)
        if alts:
            out[code]["alternatives"] = alts

    out["_meta"] = {
        "source": f"huggingface/fineweb-2 configs at {fw_commit}",
        "datatrove_commit": f"huggingface/datatrove {dt_commit}",
        "generated_by": "benchmarks/fineweb2_table.py",
        "date": date,
        "languages": len(out),
        "keys": f"py3langid 0.4.0 codes ({len(PY3LANGID_CODES)} classes); each entry's 'fineweb2' is the config "
                "(configs/<fineweb2>.yml), 'mapped_by' the rule that chose it, 'alternatives' other configs "
                "of the same code or language (most documents first; fineweb2-language-distribution.csv)",
        "unmapped": unmapped,
        "unmapped_notes": NO_CONFIG_NOTES,
        "note_en": NO_CONFIG_NOTES["en"],
        "key_map": dict(sorted(key_map.items())),
        "pipeline_constants": constants,
        "datatrove_defaults": defaults,
        "datatrove_defaults_note": "arguments fineweb-2-pipeline.py leaves at datatrove's defaults (the filters' "
                                   "__init__); every filter also gets language=<fineweb2> (which word tokenizer)",
        "glotlid_and_minhash": other,
        "notes": [
            "language_score is a GlotLID probability (LanguageFilter(backend='glotlid')), "
            "not comparable with py3langid's.",
            "line_punct_thr 0.0 or -1 turns the line-punctuation check off (ratio < thr never holds); -1 is in most "
            "low-resource configs. min_avg_word_length 0 and dup_line_frac 0 turn their checks off.",
            "max_non_alpha_words_ratio is a minimum share of words containing a letter (datatrove's name).",
        ],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fineweb2", required=True, help="huggingface/fineweb-2: bare git dir or checkout")
    ap.add_argument("--datatrove", required=True, help="huggingface/datatrove: bare git dir or checkout")
    ap.add_argument("--out", required=True, help="the JSON to write (lmcore/data/clean/fineweb2.json)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="_meta.date (default: today)")
    args = ap.parse_args()
    table = build(Repo(args.fineweb2), Repo(args.datatrove), args.date)
    text = json.dumps(table, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"{args.out}: {table['_meta']['languages']} languages, {len(text.encode('utf-8'))} bytes; "
          f"unmapped: {', '.join(table['_meta']['unmapped'])}")


if __name__ == "__main__":
    main()
