"""The evaluate stage's language-model part: strided windows, bits per byte on the validation split
and on any held-out text, the standalone evaluate_texts, and DVC metrics (real MLflow, real DVC)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, ROOT, WORDS, mlflow_runs, run_env

from lmcore import config
from lmcore.config import ConfigError, EncodeConfig, EvaluateConfig, ExportConfig, TokenizerConfig, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import sha256_file
from lmcore.eval.evaluate import evaluate, evaluate_texts, read_documents
from lmcore.eval.report import report_table
from lmcore.eval.scored import encode_documents, split_selection
from lmcore.eval.tasks import write_submission
from lmcore.eval.windows import sliding_window_nll, window_plan
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.folder import save_decoder

OFF = TrackingConfig(enabled=False)
UNICODE = ["café", "naïve", "Zürich", "—", "東京", "🙂", "Ελλάδα"]  # 2, 3 and 4 UTF-8 bytes per character


# --------------------------------------------------------------------------------------------- windows


def _tiny_model(vocab: int = 50, block: int = 8) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=block)).eval()


@torch.no_grad()
def _token_nll(model: Decoder, tokens: np.ndarray, begin: int, t: int) -> float:
    """-log p(tokens[t] | tokens[begin:t]), one forward pass for this token alone."""
    x = torch.from_numpy(tokens[begin:t].astype(np.int64))[None]
    logits, _ = model(x)
    return -float(torch.log_softmax(logits[0, -1].double(), -1)[int(tokens[t])])


def _context_start(t: int, n: int, block: int, stride: int) -> int:
    """Where the context of token t starts in Hugging Face's strided evaluation with windows of
    block + 1 tokens every `stride` tokens: t is scored by the first window whose targets reach
    it; the last window ends at the last token and has a full context."""
    k = max(0, math.ceil((t - block) / stride))  # the first window k (begin k * stride) whose targets reach t
    last = max(0, math.ceil((n - 1 - block) / stride))
    return min(k * stride, max(0, n - block - 1)) if k == last else k * stride


@pytest.mark.parametrize("n", [2, 9, 10, 23, 41])
@pytest.mark.parametrize("stride", [1, 3, 5, 8])
def test_sliding_window_equals_a_brute_force_token_by_token_computation(n, stride):
    block = 8
    model = _tiny_model(block=block)
    tokens = np.random.default_rng(n).integers(0, 50, size=n).astype(np.uint16)
    want = 0.0
    for t in range(1, n):
        begin = _context_start(t, n, block, stride)
        assert 1 <= t - begin <= block  # at most the model's context
        assert t - begin >= min(t, block - stride + 1)  # and never less than block - stride + 1 tokens
        want += _token_nll(model, tokens, begin, t)
    for batch_size in (1, 3, 16):
        total, count = sliding_window_nll(model, tokens, block, stride, batch_size=batch_size)
        assert count == n - 1
        assert math.isclose(total, want, rel_tol=1e-5), (total, want)


def test_stride_one_gives_every_token_its_full_context():
    block, n = 8, 30
    model = _tiny_model(block=block)
    tokens = np.random.default_rng(7).integers(0, 50, size=n).astype(np.uint16)
    want = sum(_token_nll(model, tokens, max(0, t - block), t) for t in range(1, n))
    assert math.isclose(sliding_window_nll(model, tokens, block, 1, batch_size=5)[0], want, rel_tol=1e-5)


def test_window_plan_scores_each_token_once_and_rejects_bad_strides():
    for n in (2, 8, 9, 10, 50):
        for stride in (1, 2, 7, 8):
            scored = []
            for b, e, first in window_plan(n, 8, stride):
                assert 0 < e - b <= 9 and 0 <= first < e - b - 1
                scored += range(b + 1 + first, e)
            assert scored == list(range(1, n))
    with pytest.raises(StageError, match="stride = 9"):
        window_plan(20, 8, 9)


# --------------------------------------------------------------------------------------------- a tiny project


def _doc(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(UNICODE) if rng.random() < 0.08 else rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 9]).capitalize() + "." for i in range(0, len(words), 9)]
    return "\n".join(lines) + "\n"


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Clean splits (two validation shards), a trained tokenizer, token shards and an untrained model."""
    from lmcore.data.encode import encode
    from lmcore.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    rng = random.Random(3)
    train = [_doc(rng, 120) for _ in range(30)]
    val = [_doc(rng, rng.randint(20, 60)) for _ in range(12)]
    _write_jsonl(root / "clean/train/00000.jsonl", train)
    _write_jsonl(root / "clean/validation/00000.jsonl", val[:5])
    _write_jsonl(root / "clean/validation/00001.jsonl", val[5:])
    train_tokenizer(TokenizerConfig(vocab_size=400), root / "clean", root / "tokenizer", root / "m/tokenizer.json", OFF)
    encode(EncodeConfig(workers=1), root / "clean", root / "tokenizer", root / "tokens", root / "m/encode.json", OFF)
    manifest = json.loads((root / "tokens/manifest.json").read_text())
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=manifest["vocab_size"], n_layer=1, n_head=2, n_embd=32, block_size=16))
    save_decoder(model, root / "model", {"tokenizer_sha256": manifest["tokenizer_sha256"], "steps": 0})
    # held-out text: a plain text file and JSONL files matched by a glob
    held = [_doc(rng, rng.randint(15, 40)) for _ in range(6)]
    (root / "heldout").mkdir()
    (root / "heldout/story.txt").write_text(held[0], encoding="utf-8")
    _write_jsonl(root / "heldout/a.jsonl", held[1:4])
    _write_jsonl(root / "heldout/b.jsonl", held[4:])
    return {"root": root, "val": val, "held": held}


def _run(project, tmp_path, cfg: EvaluateConfig, tracking: TrackingConfig = OFF) -> dict:
    root = project["root"]
    res = evaluate(cfg, root / "tokens", root / "model", tmp_path / "finetune", root / "tokenizer", [],
                   tmp_path / "runs/evaluate", tmp_path / "metrics/evaluate.json", tracking)
    on_disk = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert on_disk == res.metrics
    return on_disk


def _utf8_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def test_validation_and_held_out_text_metrics(project, tmp_path):
    root = project["root"]
    held = project["held"]
    texts = [{"name": "story", "paths": [str(root / "heldout/story.txt")]},
             {"name": "jsonl", "paths": [str(root / "heldout/*.jsonl")]}]
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="lmcore-test")
    m = _run(project, tmp_path, EvaluateConfig(stride=8, texts=texts, prompts=["The"], max_new_tokens=2), tracking)

    keys = list(m)
    assert keys[0] == "lm.val_bpb"  # the validation split first, then the texts in the order listed
    assert keys.index("lm.val_perplexity") < keys.index("lm.story.bpb") < keys.index("lm.jsonl.bpb")
    manifest = json.loads((root / "tokens/manifest.json").read_text())
    val_info = manifest["splits"]["validation"]
    assert m["lm.val_bytes"] == val_info["bytes"] == _utf8_bytes(project["val"])
    assert m["lm.val_tokens"] == val_info["tokens"] and m["lm.val_documents"] == 12
    # bytes: exactly the UTF-8 bytes of the documents (non-ASCII included), whatever the tokenizer
    assert m["lm.story.bytes"] == _utf8_bytes(held[:1]) and m["lm.story.documents"] == 1
    assert m["lm.jsonl.bytes"] == _utf8_bytes(held[1:]) and m["lm.jsonl.documents"] == 5
    assert m["lm.jsonl.bytes"] > sum(len(t) for t in held[1:])  # bytes, not characters
    from lmcore.data.tokenizer import load

    tok = load(root / "tokenizer")
    assert m["lm.jsonl.tokens"] == sum(len(tok.encode(t).ids) + 1 for t in held[1:])  # each + end-of-text
    for p in ("lm.val_", "lm.story.", "lm.jsonl."):
        # bits per byte and perplexity describe the same NLL
        assert math.isclose(m[p + "bpb"], math.log2(m[p + "perplexity"]) * m[p + "tokens"] / m[p + "bytes"])
        # an untrained model is close to uniform over the vocabulary
        assert math.isclose(m[p + "perplexity"], manifest["vocab_size"], rel_tol=0.2)
    assert "lm.unigram_val_bpb" in m and "lm.jsonl.unigram_bpb" in m
    report = (tmp_path / "runs/evaluate/report.md").read_text()
    assert "| language model | jsonl bits per byte |" in report

    # MLflow: the same numbers, and what was evaluated
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.data.tags["lmcore.stage"] == "evaluate"
    assert math.isclose(run.data.metrics["lm.jsonl.bpb"], m["lm.jsonl.bpb"])
    assert run.data.metrics["lm.val_bpb"] == pytest.approx(m["lm.val_bpb"])
    assert run.data.params["model.n_layer"] == "1" and run.data.params["tokenizer.vocab_size"] == "400"
    assert json.loads(run.data.params["evaluate.texts"])[1]["name"] == "jsonl"

    # the standalone function gives the same numbers for the same files
    alone = evaluate_texts(root / "model", [root / "heldout/a.jsonl", root / "heldout/b.jsonl"], root / "tokenizer",
                           stride=8)
    assert alone["bytes"] == m["lm.jsonl.bytes"] and alone["tokens"] == m["lm.jsonl.tokens"]
    assert math.isclose(alone["bpb"], m["lm.jsonl.bpb"], rel_tol=1e-6)


def test_max_tokens_keeps_whole_documents_and_counts_their_exact_bytes(project, tmp_path):
    root = project["root"]
    held = project["held"]
    from lmcore.data.tokenizer import load

    tok = load(root / "tokenizer")
    lengths = [len(tok.encode(t).ids) + 1 for t in held[1:]]  # the jsonl documents, end-of-text included
    budget = lengths[0] + lengths[1] + lengths[2] // 2  # two whole documents and half of the third
    # the first two documents alone, as a file of their own
    _write_jsonl(tmp_path / "two.jsonl", held[1:3])
    cut = evaluate_texts(root / "model", [str(root / "heldout/*.jsonl")], root / "tokenizer", stride=8,
                         max_tokens=budget)
    two = evaluate_texts(root / "model", [tmp_path / "two.jsonl"], root / "tokenizer", stride=8)
    assert cut["documents"] == 2 and cut["tokens"] == lengths[0] + lengths[1] and not cut["cut"]
    assert cut["bytes"] == two["bytes"] == _utf8_bytes(held[1:3])
    assert math.isclose(cut["bpb"], two["bpb"], rel_tol=1e-6)
    # a first document longer than max_tokens: its beginning, and the bytes of that beginning
    short = evaluate_texts(root / "model", [root / "heldout/story.txt"], root / "tokenizer", max_tokens=10)
    assert short["cut"] and short["tokens"] == 10 and short["documents"] == 1
    enc = tok.encode(held[0])
    assert short["bytes"] == len(held[0][: enc.offsets[9][1]].encode("utf-8"))


def test_validation_max_tokens_counts_bytes_of_exactly_the_documents_scored(project, tmp_path):
    from lmcore.data.encode import load_tokens
    from lmcore.data.tokenizer import load

    root = project["root"]
    val_docs = project["val"]
    tok = load(root / "tokenizer")
    val = load_tokens(root / "tokens", "validation")
    info = json.loads((root / "tokens/manifest.json").read_text())["splits"]["validation"]
    ends = np.cumsum([len(tok.encode(t).ids) + 1 for t in val_docs])
    for k in (1, 4, 5, 6, 11):  # inside the first shard, at its end, inside the second, ...
        for budget in (int(ends[k - 1]), int(ends[k - 1]) + 3):
            tokens, n_bytes, docs, cut = split_selection(val, info, budget, tok)
            assert (tokens, docs, cut) == (int(ends[k - 1]), k, False)
            assert n_bytes == _utf8_bytes(val_docs[:k])  # against the clean text itself
    m = _run(project, tmp_path, EvaluateConfig(stride=8, max_tokens=int(ends[6]) + 2, max_new_tokens=1))
    assert m["lm.val_tokens"] == ends[6] and m["lm.val_bytes"] == _utf8_bytes(val_docs[:7])
    assert m["lm.val_documents"] == 7


def test_a_normalising_tokenizer_still_divides_by_the_bytes_of_the_text_it_read(tmp_path):
    """With ``tokenizer.normalizer: nfkc`` the tokens decode to the folded text ('ﬁ ①' -> 'fi 1',
    5 bytes fewer): max_tokens counted those decoded bytes while the whole split counts the text's,
    so the two bits per byte could not be compared."""
    from lmcore.data.encode import encode, load_tokens
    from lmcore.data.tokenizer import load, train_tokenizer

    rng = random.Random(5)
    folded = "Ｆｕｌｌ ﬁnal ① ㎏ Ⅻ ﬀ"
    docs = [_doc(rng, 30) + folded for _ in range(8)]
    _write_jsonl(tmp_path / "clean/train/00000.jsonl", docs * 3)
    _write_jsonl(tmp_path / "clean/validation/00000.jsonl", docs[:3])
    _write_jsonl(tmp_path / "clean/validation/00001.jsonl", docs[3:])
    train_tokenizer(TokenizerConfig(vocab_size=300, normalizer="nfkc"), tmp_path / "clean", tmp_path / "tok",
                    tmp_path / "m/t.json", OFF)
    encode(EncodeConfig(workers=1), tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m/e.json", OFF)
    tok = load(tmp_path / "tok")
    assert len(tok.decode(tok.encode(folded).ids).encode("utf-8")) < len(folded.encode("utf-8"))  # folded
    val = load_tokens(tmp_path / "tokens", "validation")
    info = json.loads((tmp_path / "tokens/manifest.json").read_text())["splits"]["validation"]
    assert info["bytes"] == _utf8_bytes(docs)
    ends = np.cumsum([len(tok.encode(t).ids) + 1 for t in docs])
    for k in (1, 2, 3, 4, 7):  # inside the first shard, at its end, inside the second
        tokens, n_bytes, n_docs, cut = split_selection(val, info, int(ends[k - 1]), tok)
        assert (tokens, n_docs, cut, n_bytes) == (int(ends[k - 1]), k, False, _utf8_bytes(docs[:k]))
    # the beginning of a first document longer than max_tokens: its share of the text's bytes
    tokens, n_bytes, n_docs, cut = split_selection(val, info, int(ends[0]) // 2, tok)
    assert cut and n_docs == 1 and 0.3 * _utf8_bytes(docs[:1]) < n_bytes < 0.7 * _utf8_bytes(docs[:1])


def test_same_text_with_another_tokenizer_has_the_same_bytes(project, tmp_path):
    from lmcore.data.tokenizer import train_tokenizer

    root = project["root"]
    train_tokenizer(TokenizerConfig(vocab_size=300), root / "clean", tmp_path / "tok300", tmp_path / "m.json", OFF)
    from lmcore.data.tokenizer import load

    vocab = load(tmp_path / "tok300").get_vocab_size()
    torch.manual_seed(1)
    save_decoder(Decoder(DecoderConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, block_size=16)), tmp_path / "model300",
             {"tokenizer_sha256": sha256_file(tmp_path / "tok300/tokenizer.json")})
    files = [str(root / "heldout/*.jsonl")]
    a = evaluate_texts(root / "model", files, root / "tokenizer")
    b = evaluate_texts(tmp_path / "model300", files, tmp_path / "tok300")
    assert a["bytes"] == b["bytes"] and a["tokens"] < b["tokens"]  # a larger vocabulary, fewer tokens
    # a model with a tokenizer it was not trained with is refused
    with pytest.raises(StageError, match="is not the tokenizer"):
        evaluate_texts(root / "model", files, tmp_path / "tok300")


def test_exported_llama_folder_scores_like_the_lmcore_model(project, tmp_path):
    from lmcore.export import export

    root = project["root"]
    export(ExportConfig(), root / "model", root / "tokenizer", tmp_path / "export", tmp_path / "export.json", OFF)
    files = [root / "heldout/story.txt"]
    a = evaluate_texts(root / "model", files, root / "tokenizer", stride=4)
    b = evaluate_texts(tmp_path / "export", files, stride=4)  # the tokenizer is in the folder
    assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
    assert math.isclose(a["bpb"], b["bpb"], rel_tol=1e-5)


def test_text_is_tokenized_by_the_encode_stages_own_rules(project):
    """The validation documents, re-tokenized as held-out text, give exactly the encode stage's
    token shards and manifest bytes; a special-token string inside a document stays text."""
    from lmcore.data.encode import encode_batches, load_tokens
    from lmcore.data.tokenizer import load, special_ids, specials_as_text

    root = project["root"]
    tok = load(root / "tokenizer")
    info = json.loads((root / "tokens/manifest.json").read_text())["splits"]["validation"]
    ids, n_bytes, docs, cut = encode_documents(tok, iter(project["val"]), None)
    np.testing.assert_array_equal(ids, np.asarray(load_tokens(root / "tokens", "validation")))
    assert (n_bytes, docs, cut) == (info["bytes"], 12, False)

    eot = special_ids(tok).eot
    assert not tok.encode_special_tokens
    ids, _, docs, _ = encode_documents(tok, iter(["one <|endoftext|> two", "three"]), None)
    assert docs == 2 and ids[-1] == eot and int((ids == eot).sum()) == 2  # the two after the documents only
    assert not tok.encode_special_tokens  # put back
    with pytest.raises(ValueError, match="specials_as_text"):
        next(encode_batches(tok, ["text"], 4, eot))  # "<|endoftext|>" would become a separator
    with specials_as_text(tok):
        (texts, [first, second]), = encode_batches(tok, ["one <|endoftext|> two", "three"], 4, eot)
    assert texts == ["one <|endoftext|> two", "three"] and first[-1] == second[-1] == eot
    assert eot not in first[:-1] and np.array_equal(ids, np.array(first + second, dtype=np.uint32))


def test_report_table_and_submission_zip(tmp_path):
    table = report_table([("language model", "validation bits per byte", 1.23456, 2.0, "unigram"),
                          ("GLUE", "score (1 of 9 tasks)", 0.5, float("nan"), "")])
    assert table.splitlines() == ["| what | metric | model | baseline | baseline kind |", "|---|---|---|---|---|",
                                  "| language model | validation bits per byte | 1.2346 | 2.0000 | unigram |",
                                  "| GLUE | score (1 of 9 tasks) | 0.5000 |  |  |"]
    files = [tmp_path / "CoLA.tsv", tmp_path / "notes.tsv"]
    for f in files:
        f.write_text("index\tprediction\n0\t1\n")
    assert write_submission(files, tmp_path) == 1  # the leaderboard files only
    assert zipfile.ZipFile(tmp_path / "glue_submission.zip").namelist() == ["CoLA.tsv"]


def test_unreadable_text_is_named_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("line one\nline two\nthree \xe9\n".encode() + b"\xff\xfe broken\n")
    with pytest.raises(StageError, match=r"bad\.txt: line 4: invalid UTF-8"):
        list(read_documents([bad]))
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(StageError, match=r"bad\.jsonl: line 3: .*'text'"):
        list(read_documents([jl]))
    jl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"bad\.jsonl: line 2: invalid UTF-8"):
        list(read_documents([jl]))
    with pytest.raises(StageError, match="evaluate.texts .*no file matches"):
        list(read_documents([str(tmp_path / "none/*.txt")], what="evaluate.texts (x)"))
    (tmp_path / "alt.jsonl").write_text('{"body": "other field"}\n')
    assert list(read_documents([tmp_path / "alt.jsonl"], text_field="body")) == ["other field"]


def test_texts_settings_are_validated(tmp_path):
    def load(texts):
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump({"evaluate": {"texts": texts}}))
        return config.load(p)

    assert load([{"name": "wiki-2", "paths": ["a.txt"]}]).evaluate.texts[0].text_field == "text"
    with pytest.raises(ConfigError, match=r"evaluate\.texts\.0\.name = 'a b'"):
        load([{"name": "a b", "paths": ["a.txt"]}])
    with pytest.raises(ConfigError, match=r"evaluate\.texts.*x given to more than one"):
        load([{"name": "x", "paths": ["a.txt"]}, {"name": "x", "paths": ["b.txt"]}])
    with pytest.raises(ConfigError, match=r"evaluate\.texts\.0\.paths"):
        load([{"name": "x", "paths": []}])
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate\.texts\.0\.field'"):
        load([{"name": "x", "paths": ["a"], "field": "t"}])


# --------------------------------------------------------------------------------------------- DVC metrics


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dvc_metrics_diff_compares_evaluate_metrics_between_commits(project, tmp_path):
    """The metrics file, declared as in the project's dvc.yaml, compared by `dvc metrics diff`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {"cmd": stage["cmd"],
                                                                           "metrics": stage["metrics"]}}}))
    env = run_env()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True, env=env)
    texts = [{"name": "story", "paths": [str(project["root"] / "heldout/story.txt")]}]
    first = _run(project, repo, EvaluateConfig(stride=16, texts=texts, max_new_tokens=1))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "stride 16")
    second = _run(project, repo, EvaluateConfig(stride=2, texts=texts, max_new_tokens=1))
    assert second["lm.val_bpb"] != first["lm.val_bpb"]  # more context per token

    out = subprocess.run([str(BIN / "dvc"), "metrics", "diff", "--json"], cwd=repo, check=True, env=env,
                         capture_output=True, text=True).stdout
    diff = json.loads(out)["metrics/evaluate.json"]
    assert diff["lm.val_bpb"]["old"] == pytest.approx(first["lm.val_bpb"])
    assert diff["lm.val_bpb"]["new"] == pytest.approx(second["lm.val_bpb"])
    assert diff["lm.story.bpb"]["diff"] == pytest.approx(second["lm.story.bpb"] - first["lm.story.bpb"])
    assert "lm.val_bytes" not in diff  # unchanged values are left out
    table = subprocess.run([str(BIN / "dvc"), "metrics", "diff", "--md"], cwd=repo, check=True, env=env,
                           capture_output=True, text=True).stdout
    assert "lm.val_bpb" in table and "metrics/evaluate.json" in table


def test_local_multiple_choice_files_are_scored_zero_shot_and_a_bad_one_stops_first(project, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"q": f"The king {i}", "options": ["a", "bb", "ccc"], "answer": i % 3}) + "\n"
                          for i in range(6)))
    cfg = EvaluateConfig(stride=8, prompts=["The"], max_new_tokens=2, multiple_choice=[
        {"name": "toy", "path": str(mc), "context_field": "q", "choices_field": "options", "gold_field": "answer"}])
    m = _run(project, tmp_path, cfg)
    assert m["mc.toy.examples"] == 6 and 0 <= m["mc.toy.acc"] <= 1 and 0 <= m["mc.toy.acc_norm"] <= 1
    assert "| multiple choice toy | zero-shot accuracy |" in (tmp_path / "runs/evaluate/report.md").read_text()
    mc.write_text('{"q": "x", "options": ["a", "b"], "answer": 5}\n')
    with pytest.raises(StageError, match=r"mc.jsonl:1: answer = 5 is not the index"):
        _run(project, tmp_path / "again", cfg)
    assert not (tmp_path / "again/runs/evaluate").exists()


def test_held_out_files_are_read_relative_to_the_project_folder():
    """`lmcore --root proj evaluate` run from elsewhere looked for evaluate.texts in the working
    directory (prepare already read its inputs inside --root)."""
    from lmcore.core.layout import Layout

    cfg = EvaluateConfig(texts=[{"name": "h", "paths": ["held/*.txt", "/abs/x.txt"]}],
                         multiple_choice=[{"name": "mc", "path": "mc/set.jsonl"}])
    rooted = cfg.rooted(Layout(Path("/proj")))
    assert rooted.texts[0].paths == ["/proj/held/*.txt", "/abs/x.txt"]
    assert rooted.multiple_choice[0].path == "/proj/mc/set.jsonl"
    assert rooted.input_files() == ["/proj/held/*.txt", "/abs/x.txt", "/proj/mc/set.jsonl"]
    assert cfg.rooted(Layout()).texts[0].paths == ["held/*.txt", "/abs/x.txt"]
