"""``lmcore generate``: continue prompts with a model folder (not a pipeline stage).

Argument parsing, prompt files and printing; the generation itself is :mod:`lmcore.generate`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmcore import config
from lmcore.config import ConfigError, Sampling, number_types
from lmcore.core.errors import StageError
from lmcore.core.layout import Layout
from lmcore.core.machine import require_cxx_compiler

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    """The ``generate`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("generate", help="generate text from a model folder (KV cache, sampling, streaming; not a "
                                        "pipeline stage)",
                       description="Continue prompts with a trained model. Prompts come from --prompt, else from "
                                   "--file, else from standard input: one prompt per line (a .jsonl file: a JSON "
                                   "string or an object with a 'prompt' field per line, for prompts with newlines). "
                                   "Sampling defaults come from the evaluate section of the params file.")
    p.add_argument("--model", help="model folder: runs/pretrain/final (default, under --root), a registered "
                                   "model (models:/lmcore-base@champion) or an exported "
                                   "Hugging Face Llama folder such as runs/export")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder when it holds "
                                       "tokenizer.json, else data/tokenizer under --root)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--file", help="a file of prompts, one per line (.jsonl: one JSON string or {'prompt': ...} "
                                  "per line); '-' is standard input")
    add_sampling_flags(p)
    p.add_argument("--no-cache", action="store_true", help="encode the whole sequence at every step (slower; "
                                                            "the reference path)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile (a CUDA "
                                                           "graph on CUDA): the first tokens wait for the compilation "
                                                           "(seconds to a minute), the rest come faster")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (default auto: the GPU where there is one)")
    p.add_argument("--no-stream", action="store_true", help="print each text once complete, not token by token")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="prompts decoded together (default 32); more prompts run in batches of N, one after the "
                        "other, each batch's KV cache freed before the next (a batch draws with --seed plus its "
                        "index)")


# what a flag's value means beyond the field's own documentation
_FLAG_NOTES = {"top_k": "0: all."}


def flag(name: str) -> str:
    """The command-line flag of a :class:`lmcore.config.Sampling` field: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`lmcore.config.Sampling`, its type and help from the field
    (the default of each is the field of the params file's ``evaluate`` section)."""
    for name, f in Sampling.model_fields.items():
        kinds = number_types(f.annotation)  # Seed | None: int
        doc = " ".join((f.description or "").replace("``", "").split())
        note = f" {_FLAG_NOTES[name]}" if name in _FLAG_NOTES else ""
        p.add_argument(flag(name), type=kinds[0], metavar=name.upper(),
                       help=f"{doc}{note} (default: evaluate.{name})".replace("%", "%%"))


def read_prompts(path: str | Path | None, stdin=None) -> list[str]:
    """Prompts from a file (one per line; ``.jsonl``: a JSON string or an object with a
    ``prompt`` field per line) or, for None or ``-``, from ``stdin``. Blank lines are skipped."""
    if path is None or str(path) == "-":
        name, lines = "standard input", (stdin or sys.stdin).read().splitlines()
    else:
        p = Path(path)
        if not p.is_file():
            raise StageError(f"--file {p}: not found")
        try:
            name, lines = str(p), p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise StageError(f"{p}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    jsonl = path is not None and str(path).endswith((".jsonl", ".ndjson"))
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{name}: line {n}: not valid JSON ({e.msg})") from None
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise StageError(f"{name}: line {n}: expected a JSON string or an object with a string field 'prompt'")
        out.append(text)
    if not out:
        raise StageError(f"{name}: no prompt (one per line)")
    return out


def settings(args: argparse.Namespace, defaults: Sampling) -> Any:
    """Command-line values over ``defaults`` (the sampling fields of an
    :class:`lmcore.config.EvaluateConfig`), as a :class:`lmcore.generate.GenerationConfig`."""
    # lazy: the CLI loads a command's code (torch) only when that command runs
    from lmcore.generate import GenerationConfig

    values = {name: getattr(defaults, name) if getattr(args, name) is None else getattr(args, name)
              for name in Sampling.model_fields}
    if values["top_k"] == 0:
        values["top_k"] = None
    if args.compile and args.no_cache:
        raise StageError("--compile and --no-cache do not go together: what is compiled is the cached decode step")
    if values["seed"] is None and values["temperature"] != 0:  # drawn here, and printed: a run to repeat with --seed
        values["seed"] = secrets.randbelow(2**31)
    try:
        return GenerationConfig(**values, use_cache=not args.no_cache, compile=args.compile)
    except ValidationError as e:  # name the command-line option (params.yaml's values were checked on loading)
        raise StageError("; ".join(f"{flag(str(err['loc'][0]))} = {err['input']!r} is invalid ({err['msg']})"
                                   if err["loc"] else err["msg"] for err in e.errors())) from None


def run_device(choice: str) -> str:
    """``--device``: ``auto`` is the GPU where there is one."""
    import torch  # lazy: the CLI loads torch only when a command runs

    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda: no CUDA device here (auto runs on the CPU then)")
    return "cuda" if choice == "auto" and torch.cuda.is_available() else ("cpu" if choice == "auto" else choice)


def registered(uri: str, params: str) -> Path:
    """A registered model (``models:/<name>@<alias>``, ``models:/<name>/<version>``) downloaded
    from the registry of ``params``' tracking store into a temporary folder."""
    from lmcore.tracking import download_model  # lazy: MLflow loads only for a registered model

    tmp = tempfile.mkdtemp(prefix="lmcore-model-")
    atexit.register(shutil.rmtree, tmp, True)
    return download_model(config.load(params).tracking, uri, Path(tmp))


def main(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    """Run ``lmcore generate`` from parsed arguments (also reads ``args.params`` and ``args.root``)."""
    # lazy: the CLI loads a command's code (torch) only when that command runs
    from lmcore.data import tokenizer as tokmod
    from lmcore.generate import TextStream, encode_prompts, stream
    from lmcore.model.folder import check_tokenizer, load_lm


    out = stdout or sys.stdout
    layout = Layout(Path(args.root))
    try:
        defaults = config.load_present(args.params, args.params_given).evaluate
        cfg = settings(args, defaults)
        model_dir = registered(args.model, args.params) if (args.model or "").startswith("models:/") else (
            Path(args.model) if args.model else layout.pretrained)
        if not (model_dir / "config.json").is_file():
            raise StageError(f"{model_dir}: no model folder here (config.json missing); give --model, e.g. "
                             "runs/pretrain/final or runs/export")
        tok_path = Path(args.tokenizer) if args.tokenizer else (
            model_dir if (model_dir / "tokenizer.json").is_file() else layout.tokenizer)
        tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
        prompts = list(args.prompt) if args.prompt else read_prompts(args.file, stdin)
        model, model_cfg = load_lm(model_dir)
        model = model.to(run_device(args.device))
        tok = tokmod.load(tok_file)
        check_tokenizer(model_cfg, model.cfg.vocab_size, tok, tok_file, model_dir)
        sp = tokmod.special_ids(tok, model_cfg)
        ids = encode_prompts(tok, prompts, sp.eot)
        if args.batch_size < 1:
            raise StageError(f"--batch-size = {args.batch_size}: at least 1")
        if cfg.compile:  # refused before the prompt is printed, not at the first step
            require_cxx_compiler("--compile", next(model.parameters()).device)
    except (ConfigError, StageError) as e:
        print(f"lmcore generate: error: {e}", file=sys.stderr)
        return 2

    block = model.cfg.block_size
    if max(map(len, ids)) + cfg.max_new_tokens > block:
        log.info("generate: prompt + %d new tokens may exceed the model's context of %d tokens: past it, each step "
                 "encodes the last %d tokens again without the cache", cfg.max_new_tokens, block, block)
    streams = [TextStream(tok, p) for p in ids]
    finished = [False] * len(ids)
    shown = 0  # texts printed so far (in prompt order)
    live = len(ids) == 1 and not args.no_stream

    def show_done() -> None:
        nonlocal shown
        while shown < len(ids) and finished[shown]:
            if len(ids) > 1:
                out.write(("\n" if shown else "") + f"==> {shown + 1}/{len(ids)} <==\n")
            out.write(prompts[shown] + streams[shown].text() + "\n")
            shown += 1
        out.flush()

    if live:
        out.write(prompts[0])
        out.flush()
    n_tokens, t0 = 0, time.perf_counter()
    try:
        for k, lo in enumerate(range(0, len(ids), args.batch_size)):  # memory: B x the KV cache, B x vocab
            batch = cfg if cfg.seed is None else cfg.model_copy(update={"seed": cfg.seed + k})
            for step in stream(model, ids[lo : lo + args.batch_size], batch, stop_id=sp.eot, pad_id=sp.pad):
                for i, t in enumerate(step, lo):
                    if t is None:
                        continue
                    n_tokens += 1
                    if t == sp.eot:
                        finished[i] = True
                        continue
                    if live:
                        out.write(streams[i].push(t))
                        out.flush()
                    else:
                        streams[i].tokens.append(t)
                if not live and not args.no_stream:
                    show_done()
            finished[lo : lo + args.batch_size] = [True] * len(ids[lo : lo + args.batch_size])
            if not live and not args.no_stream:
                show_done()
    except KeyboardInterrupt:
        out.write("\n")
        print("lmcore generate: interrupted", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    if live:
        out.write(streams[0].flush() + "\n")
        out.flush()
    else:
        finished = [True] * len(ids)
        show_done()
    print(f"lmcore generate: {n_tokens} tokens for {len(ids)} prompt(s) in {seconds:.2f} s "
          f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s, KV cache {'on' if cfg.use_cache else 'off'}, "
          f"{'decode step compiled (the compilation included), ' if cfg.compile else ''}"
          f"seed {cfg.seed})", file=sys.stderr)
    return 0
