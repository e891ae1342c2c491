"""lmcore's document-level bits per byte against lm-evaluation-harness itself, on the same bytes.

Writes the first ``--limit`` clean validation documents of a project to a JSONL file and a
local-file ``loglikelihood_rolling`` task for them, runs ``lm_eval --model hf`` on the project's
exported model (``runs/export``), then ``lmcore score`` on the same documents with the export
(through transformers) and with lmcore's own folder (``runs/pretrain/final``), and prints the
three side by side with their relative differences. Goal: within 0.1 %.

    python benchmarks/lmeval_agreement.py --project /path/after/make-pipeline \\
        --lm-eval /tmp/lmeval-venv/bin/lm_eval --limit 3

lm-evaluation-harness is not a dependency of lmcore: install it anywhere (``pip install
'lm_eval[hf]'``, offline from PyPI with the CPU torch) and point ``--lm-eval`` at its executable.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = """task: lmcore_validation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def lmcore_score(project: Path, model: str, data: Path, backend: str) -> dict:
    lmcore = Path(sys.executable).with_name("lmcore")
    t = time.time()
    out = subprocess.run([str(lmcore), "score", model, "--texts", str(data), "--backend", backend, "--json"],
                         cwd=project, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.time() - t
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable")
    ap.add_argument("--limit", type=int, default=3, help="validation documents to score")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="lmeval-agreement-"))
    docs = []
    for shard in sorted(glob.glob(str(project / "data/clean/validation/*.jsonl"))):
        with open(shard, encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    docs = docs[: args.limit]
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (work / "tasks").mkdir()
    (work / "tasks/lmcore_validation.yaml").write_text(TASK.format(data=data))

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf-home")}
    t = time.time()
    subprocess.run([args.lm_eval, "--model", "hf", "--model_args", f"pretrained={project / 'runs/export'},dtype=float32",
                    "--tasks", "lmcore_validation", "--include_path", str(work / "tasks"), "--device", "cpu",
                    "--batch_size", str(args.batch_size), "--output_path", str(work / "out")],
                   env=env, check=True, capture_output=True, text=True)
    harness_s = time.time() - t
    result = json.loads(Path(next(iter(glob.glob(str(work / "out/**/results_*.json"), recursive=True)))).read_text())
    h = result["results"]["lmcore_validation"]
    harness = {"bits_per_byte": h["bits_per_byte,none"], "byte_perplexity": h["byte_perplexity,none"],
               "word_perplexity": h["word_perplexity,none"], "seconds": harness_s}

    ours_hf = lmcore_score(project, "runs/export", data, "transformers")
    ours = lmcore_score(project, "runs/pretrain/final", data, "lmcore")
    print(f"{len(docs)} documents, {ours['tokens']:,} tokens, {ours['bytes']:,} bytes, {ours['words']:,} words; "
          f"lm_eval {result.get('lm_eval_version', '?')}, transformers {result.get('transformers_version', '?')}")
    print(f"| metric | lm-evaluation-harness | lmcore score runs/export | lmcore score runs/pretrain/final | "
          f"largest relative difference |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        rel = max(abs(ours_hf[key] - harness[key]), abs(ours[key] - harness[key])) / harness[key]
        worst = max(worst, rel)
        print(f"| {key} | {harness[key]:.6f} | {ours_hf[key]:.6f} | {ours[key]:.6f} | {rel:.2e} |")
    print(f"| seconds | {harness['seconds']:.1f} | {ours_hf['seconds']:.1f} | {ours['seconds']:.1f} | |")
    print(f"agreement within 0.1 %: {'yes' if worst < 1e-3 else 'NO'} (largest relative difference {worst:.2e})")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
