"""lmcore's document-level bits per byte against lm-evaluation-harness itself, on the same bytes.

Writes the first ``--limit`` clean validation documents of a project to a JSONL file and a
local-file ``loglikelihood_rolling`` task for them, runs ``lm_eval --model hf`` on the project's
exported model (``runs/export``), then ``lmcore score`` on the same documents with the export
(through transformers) and with lmcore's own folder (``runs/pretrain/final``), and prints the
three side by side with their relative differences. Goal: within 0.1 %. With ``--task``, also
the zero-shot accuracy of the pretrained model on a prepared task's validation split with
SST-2's harness prompt: ``lm_eval`` on a local ``multiple_choice`` task against
``lmcore score --task``; goal: equal.

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


MC_TASK = """task: lmcore_zeroshot
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def lmcore_score(project: Path, model: str, data: Path, backend: str, task: bool = False) -> dict:
    lmcore = Path(sys.executable).with_name("lmcore")
    t = time.time()
    what = ["--task", str(data)] if task else ["--texts", str(data)]
    out = subprocess.run([str(lmcore), "score", model, *what, "--backend", backend, "--json"],
                         cwd=project, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.time() - t
    return res


def run_harness(args: argparse.Namespace, project: Path, work: Path, task: str, env: dict) -> tuple[dict, float]:
    """``lm_eval --model hf`` on the project's export for one task of ``work/tasks``: its results
    JSON and the seconds it took."""
    out = work / f"out-{task}"
    t = time.time()
    subprocess.run([args.lm_eval, "--model", "hf", "--model_args", f"pretrained={project / 'runs/export'},dtype=float32",
                    "--tasks", task, "--include_path", str(work / "tasks"), "--device", "cpu",
                    "--batch_size", str(args.batch_size), "--output_path", str(out)],
                   env=env, check=True, capture_output=True, text=True)
    seconds = time.time() - t
    return json.loads(Path(next(iter(glob.glob(str(out / "**/results_*.json"), recursive=True)))).read_text()), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable")
    ap.add_argument("--limit", type=int, default=3, help="validation documents to score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task", help="also compare zero-shot scores on this prepared task (e.g. rotten_tomatoes)")
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
    result, harness_s = run_harness(args, project, work, "lmcore_validation", env)
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
    if args.task is None:
        return 0 if worst < 1e-3 else 1

    # zero-shot: the prepared task's validation examples with SST-2's harness prompt
    task_dir = project / "data/raw/tasks" / args.task
    rows = [json.loads(line) for line in (task_dir / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    mc = work / "mc.jsonl"
    mc.write_text("".join(json.dumps({"sentence": r["text_a"], "label": r["label"]}) + "\n" for r in rows))
    (work / "tasks/lmcore_zeroshot.yaml").write_text(MC_TASK.format(data=mc))
    got, mc_s = run_harness(args, project, work, "lmcore_zeroshot", env)
    h = got["results"]["lmcore_zeroshot"]
    zs_hf = lmcore_score(project, "runs/export", task_dir, "transformers", task=True)
    zs = lmcore_score(project, "runs/pretrain/final", task_dir, "lmcore", task=True)
    print(f"\nzero-shot {args.task}: {len(rows):,} validation examples, SST-2's prompt and choices")
    print("| metric | lm-evaluation-harness | lmcore score runs/export --task | lmcore score runs/pretrain/final --task |")
    print("|---|---|---|---|")
    same = True
    for key in ("acc", "acc_norm"):
        print(f"| {key} | {h[key + ',none']:.6f} | {zs_hf[key]:.6f} | {zs[key]:.6f} |")
        same &= abs(h[key + ",none"] - zs_hf[key]) < 1e-9 and abs(h[key + ",none"] - zs[key]) < 1e-9
    print(f"| seconds | {mc_s:.1f} | {zs_hf['seconds']:.1f} | {zs['seconds']:.1f} |")
    print(f"zero-shot scores equal: {'yes' if same else 'NO'}")
    return 0 if worst < 1e-3 and same else 1


if __name__ == "__main__":
    sys.exit(main())
