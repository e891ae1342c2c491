"""What more pretraining compute buys: the default pipeline at 1x, 4x and 16x its pretraining steps.

    python benchmarks/quality_ladder.py --workdir /tmp/ladder              # 1x 4x 16x, 3 seeds
    python benchmarks/quality_ladder.py --workdir /tmp/ladder --factors 1 4 --seeds 1

Each rung is the default pipeline (``benchmarks/pipeline.py``'s clone, ``<workdir>/<factor>x``) with
``pretrain.max_steps`` and ``pretrain.warmup_steps`` multiplied by the factor (the model, the
batch, the data and the learning rate stay the defaults; validation and checkpoints every
``100 x factor`` steps, so their cost stays a constant share). Compute therefore grows with the
tokens seen, and on the default corpus (1.4M training tokens) the higher rungs repeat the data:
the table gives the epochs. Every rung fine-tunes each task with ``--seeds`` seeds. The
from-scratch twin does not depend on pretraining, so only the first rung trains it; the others
show its numbers again. Prints a markdown block for RESULTS.md (machine, commit, date, command).
Run one heavy benchmark at a time: rungs share the 2 cores with nothing else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import run  # noqa: E402  (benchmarks/pipeline.py, beside this file)

from lmcore.core.machine import cpu_flags, cpu_name  # noqa: E402

BASE_STEPS, BASE_WARMUP, BASE_INTERVAL = 600, 145, 100  # params.yaml's pretrain defaults


def rung_sets(factor: int, seeds: int, scratch: bool) -> list[str]:
    """The params.yaml changes of one rung."""
    return [f"pretrain.max_steps={BASE_STEPS * factor}", f"pretrain.warmup_steps={round(BASE_WARMUP * factor)}",
            f"pretrain.eval_interval={BASE_INTERVAL * factor}", f"pretrain.checkpoint_interval={BASE_INTERVAL * factor}",
            f"finetune.defaults.seeds={seeds}", f"finetune.defaults.scratch_baseline={str(scratch).lower()}"]


def table(rungs: dict[int, tuple[dict, dict, str]]) -> list[str]:
    first = rungs[min(rungs)][1]
    tasks = sorted(k.split("/", 1)[1] for k in first if k.startswith("finetune/"))
    head = ["compute", "steps", "tokens seen", "epochs", "pretrain s", "tokens/s", "val bpb (strided)",
            "val bpb (documents)", "train loss"]
    for t in tasks:
        head += [f"{t} pretrained (mean ± std)", f"{t} zero-shot"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    train_tokens = first["encode"]["train_tokens"]
    for factor, (times, m, _) in sorted(rungs.items()):
        pt, ev = m["pretrain"], m["evaluate"]
        row = [f"{factor}x", f"{BASE_STEPS * factor:,}", f"{pt['trained_tokens'] / 1e6:.1f}M",
               f"{pt['trained_tokens'] / train_tokens:.1f}", f"{times['pretrain']:.0f}",
               f"{pt['tokens_per_second']:,.0f}", f"{ev['lm.val_bpb']:.3f}", f"{ev['lm.val_doc_bpb']:.3f}",
               f"{pt['train_loss']:.3f}"]
        for t in tasks:
            f = m[f"finetune/{t}"]
            row += [f"{f['score']:.4f} ± {f.get('score_std', 0.0):.4f}", f"{ev.get(f'{t}.zeroshot_score', float('nan')):.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for t in tasks:
        f = first[f"finetune/{t}"]
        if "scratch_score" in f:
            lines.append(f"- {t}: from scratch {f['scratch_score']:.4f} ± {f.get('scratch_score_std', 0.0):.4f}, "
                         f"majority class {f['majority_score']:.4f}, bag of words {f['bow_score']:.4f} "
                         "(none of them depends on pretraining)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="one clone per rung under it (<factor>x); kept")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more params.yaml changes, every rung")
    args = p.parse_args()
    command = " ".join(["python benchmarks/quality_ladder.py", *sys.argv[1:]])
    rungs: dict[int, tuple[dict, dict, str]] = {}
    for i, factor in enumerate(args.factors):
        times, metrics, commit = run(Path(args.workdir).resolve() / f"{factor}x",
                                     rung_sets(factor, args.seeds, scratch=i == 0) + args.set)
        metrics["encode"] = json.loads((Path(args.workdir).resolve() / f"{factor}x/metrics/encode.json").read_text())
        rungs[factor] = (times, metrics, commit)
        print(f"rung {factor}x done: {sum(times.values()):.0f} s", file=sys.stderr, flush=True)
    commit = rungs[min(rungs)][2]
    print("\n".join([f"### Quality ladder, {datetime.date.today()}, commit {commit}\n",
                     f"Machine: {cpu_name()}, {os.cpu_count()} cores, flags {cpu_flags()}. Command: `{command}`\n",
                     *table(rungs)]))


if __name__ == "__main__":
    main()
