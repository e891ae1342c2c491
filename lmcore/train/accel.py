"""Creating the Accelerator, with a guard against a silent multi-process trap.

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``)
without ``ACCELERATE_USE_CPU=true`` starts two processes that each believe they are alone: each
trains on all the data and the run "succeeds". lmcore refuses to train in that state.
"""

from __future__ import annotations

import os

from accelerate import Accelerator

from lmcore.core.errors import StageError
from lmcore.train.flops import resolve_precision


def make_accelerator(mixed_precision: str):


    mixed_precision = resolve_precision(mixed_precision)
    acc = Accelerator(mixed_precision=mixed_precision)
    if mixed_precision == "fp16" and acc.device.type == "cpu":
        raise StageError("mixed_precision 'fp16' is refused on CPU: fp16 matrix multiplies run ~100x slower than "
                         "fp32 there. Use 'bf16' (fast on CPUs with AVX-512 BF16/AMX) or 'no'")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise StageError(
            f"the launcher started {launched} processes but Accelerate sees {acc.num_processes}: each would "
            "train alone on all the data. On CPUs set ACCELERATE_USE_CPU=true (see configs/accelerate/cpu-2proc.yaml)"
        )
    return acc
