"""Time `dvc push` of a reproduced pipeline to a local-folder remote and `dvc pull` into a fresh clone.

    python benchmarks/dvc_remote.py --project /work/run11 --remote /tmp/lmcore-remote-bench

``--project`` is a git + DVC checkout whose pipeline has run (a dvc.lock and its outputs in
.dvc/cache); ``--remote`` an empty or missing folder, the remote to push to. The remote is set
for this run only, as ``bench`` in the project's .dvc/config.local (restored afterwards), so
the project's own remotes and files stay as they were. The clone is ``git clone`` of the project
plus its uncommitted files (such as a dvc.lock never committed), in ``--clone`` (default: a
temporary folder, removed afterwards).

Prints the machine (CPU model and flags, cores), the DVC version, the seconds of a first push, a
second push (nothing left to send) and a pull, the size of what went (files, MB), and what
``dvc status`` says in the clone after the pull.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lmcore.core.machine import cpu_flags, cpu_name, git_commit

DVC = str(Path(sys.executable).parent / "dvc")
REMOTE = "bench"


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Run a command, return its seconds and stdout; stop with its output if it fails."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{res.stdout}\n{res.stderr}")
    return seconds, res.stdout


def size(folder: Path) -> tuple[int, float]:
    """Files and MB under a folder (or one file)."""
    paths = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
    return len(paths), sum(p.stat().st_size for p in paths) / 1e6


def last_line(out: str) -> str:
    lines = out.strip().splitlines()
    return lines[-1].strip() if lines else ""


def machine() -> str:
    return f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores"


def uncommitted(project: Path) -> list[str]:
    """Files git has not committed (modified or untracked, not ignored): the clone gets copies."""
    _, out = run(["git", "status", "--porcelain", "--untracked-files=all"], project)
    paths = [line[3:] for line in out.splitlines() if line[:2] != " D"]
    return [p for p in paths if (project / p).is_file()]


def cached_outs(repo: Path) -> list[Path]:
    """The outputs dvc.lock names that the pull brought (the uncached ones are not there)."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = {o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    return [repo / p for p in sorted(paths) if (repo / p).exists()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True, help="a reproduced git + DVC checkout")
    ap.add_argument("--remote", type=Path, required=True, help="an empty or missing folder: the remote")
    ap.add_argument("--clone", type=Path, help="where to clone (must not exist; default: a temporary folder)")
    ap.add_argument("--jobs", type=int, help="dvc push/pull --jobs (default: DVC's own)")
    args = ap.parse_args()
    project, remote = args.project.resolve(), args.remote.resolve()
    if not (project / "dvc.lock").is_file() or not (project / ".dvc/cache").is_dir():
        raise SystemExit(f"{project} has no dvc.lock or no .dvc/cache: run the pipeline there first")
    if remote.exists() and any(remote.iterdir()):
        raise SystemExit(f"{remote} is not empty: give a new folder, so that the push sends everything")
    if args.clone and args.clone.exists():
        raise SystemExit(f"{args.clone} exists")
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []

    local_conf = project / ".dvc/config.local"
    saved = local_conf.read_bytes() if local_conf.exists() else None
    tmp = None if args.clone else tempfile.mkdtemp(prefix="lmcore-dvc-remote-")
    clone = args.clone.resolve() if args.clone else Path(tmp) / "clone"
    try:
        run([DVC, "remote", "add", "--local", "--force", REMOTE, str(remote)], project)
        push_s, push_out = run([DVC, "push", "-r", REMOTE, *jobs], project)
        again_s, again_out = run([DVC, "push", "-r", REMOTE, *jobs], project)

        run(["git", "clone", "-q", str(project), str(clone)], project.parent)
        copied = uncommitted(project)
        for rel in copied:
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, clone / rel)
        run([DVC, "remote", "add", "--local", "--force", REMOTE, str(remote)], clone)
        pull_s, pull_out = run([DVC, "pull", "-r", REMOTE, *jobs], clone)
        _, status = run([DVC, "status", "--json"], clone)
        _, version = run([DVC, "version"], clone)
        links = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                      if line.startswith("Cache types")), "?")

        r_files, r_mb = size(remote)
        outs = cached_outs(clone)
        o_files, o_mb = (sum(x) for x in zip(*(size(p) for p in outs))) if outs else (0, 0.0)
        ckpt = project / "runs/pretrain/checkpoints"
        c_files, c_mb = size(ckpt) if ckpt.exists() else (0, 0.0)
        _, dvc_version = run([DVC, "--version"], project)

        print(f"machine: {machine()}; dvc {dvc_version.strip()}; project {project} at commit "
              f"{git_commit(project)}; {datetime.date.today()}")
        print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
        print(f"remote: local folder {remote}; links the clone's file system supports: {links} "
              f"(DVC's default cache.type, reflink then copy, copies there)")
        if copied:
            print(f"copied into the clone (not committed in the project): {', '.join(copied)}")
        print()
        print("| step | seconds | what |")
        print("|---|---|---|")
        print(f"| dvc push (empty remote) | {push_s:.2f} | {r_files} files, {r_mb:.1f} MB in the remote "
              f"(\"{last_line(push_out)}\") |")
        print(f"| dvc push again (nothing to send) | {again_s:.2f} | \"{last_line(again_out)}\" |")
        print(f"| dvc pull (fresh clone) | {pull_s:.2f} | {o_files} files, {o_mb:.1f} MB in {len(outs)} outputs "
              f"(\"{last_line(pull_out)}\") |")
        print(f"\nnot pushed: runs/pretrain/checkpoints ({c_files} files, {c_mb:.1f} MB; persist, cache: false)")
        changed = json.loads(status)
        print(f"dvc status in the clone after the pull: {len(changed)} stage(s) changed"
              + "".join(f"\n  {stage}: {json.dumps(why)}" for stage, why in changed.items()))
    finally:
        if saved is None:
            local_conf.unlink(missing_ok=True)
        else:
            local_conf.write_bytes(saved)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
