"""Creating the Accelerator, with guards against launches that would not train as they say.

- On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``)
  without ``ACCELERATE_USE_CPU=true`` starts two processes that each believe they are alone: each
  trains on all the data and the run "succeeds". lmcore refuses to train in that state.
- A launch that asks for FSDP (an Accelerate config with ``distributed_type: FSDP``) on CPU
  processes: Accelerate 1.15 switches FSDP on only for GPU-like distributed types
  (``AcceleratorState.__init__`` in ``accelerate/state.py``), so CPU processes would silently train
  as plain data parallelism, each holding the whole model. FSDP2 itself runs on CPU processes
  over gloo, so lmcore switches it on the way Accelerate does on GPUs (the distributed type and
  the plugin the launcher described in the environment): the model is sharded, checkpoints are
  sharded. Any other launch that asks for FSDP and does not get it is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType, broadcast_object_list

from lmcore.core.errors import StageError
from lmcore.model.decoder import DecoderConfig
from lmcore.model.kernels import attention_dtype, attention_kernel
from lmcore.train.flops import resolve_precision


def asks_for_fsdp() -> bool:
    """The launcher was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _fsdp_version() -> int:
    return int(os.environ.get("FSDP_VERSION", "1"))


def _fsdp_on_cpu(acc: Accelerator, mixed_precision: str) -> None:
    """Turn FSDP on for CPU processes as ``AcceleratorState`` does for GPU processes."""
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment variables
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def make_accelerator(mixed_precision: str) -> Accelerator:
    mixed_precision = resolve_precision(mixed_precision)
    if asks_for_fsdp() and _fsdp_version() != 2 and not torch.cuda.is_available():
        raise StageError("the launch asks for FSDP version 1, which Accelerate runs on GPUs only (its plugin stops "
                         "with 'no available devices' here); on CPU processes lmcore shards with FSDP2: set "
                         "fsdp_version: 2 under fsdp_config in the launch.config file")
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
    if asks_for_fsdp() and acc.distributed_type != DistributedType.FSDP:
        if acc.distributed_type == DistributedType.MULTI_CPU and _fsdp_version() == 2:
            _fsdp_on_cpu(acc, mixed_precision)
        else:
            raise StageError(
                f"the launch asks for FSDP but Accelerate set up {acc.distributed_type.value} with "
                f"{acc.num_processes} process(es): it would train without sharding. On CPU processes lmcore "
                "shards with FSDP2 only: set fsdp_version: 2 under fsdp_config in the launch.config file")
    return acc


def loss_scale_restarter(accelerator: Accelerator) -> Callable[[], None]:
    """A function that puts fp16's dynamic loss scale (CUDA) back to where it starts, for each
    model trained on one accelerator (fine-tuning's seeds and from-scratch twin): Accelerate's
    ``free_memory`` forgets models and optimizers but keeps the scaler, so a seed's result
    depended on the scale the one before it ended with. Does nothing without a scaler."""
    scaler = accelerator.scaler
    if scaler is None:
        return lambda: None
    initial = scaler.state_dict()  # before any step: the initial scale and growth tracker
    return lambda: scaler.load_state_dict(initial)


def decide_attention(cfg: DecoderConfig, accelerator: Accelerator, batch_size: int, seq_len: int,
                     setting: str) -> str:
    """The causal-attention kernel of a run (:func:`lmcore.model.kernels.attention_kernel`:
    ``setting``, or for ``auto`` the faster one measured at this micro-batch, context and
    precision on this machine). The main process decides and every process gets its choice
    (processes on one machine would otherwise time each other's contention)."""
    dtype = attention_dtype(accelerator.mixed_precision, accelerator.device)
    choice = [attention_kernel(cfg, batch_size, seq_len, dtype, accelerator.device, setting)
              if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        choice = broadcast_object_list(choice)
    return choice[0]


def choose_attention(model: torch.nn.Module, accelerator: Accelerator, batch_size: int, seq_len: int,
                     setting: str) -> str:
    """Set :func:`decide_attention`'s kernel on ``model`` and return its name. A model without
    kernels to choose (another architecture, from a benchmark) keeps its own: ``sdpa`` is returned."""
    use = getattr(model, "use_attention", None)
    if use is None:
        return "sdpa"
    kernel = decide_attention(model.cfg, accelerator, batch_size, seq_len, setting)
    use(kernel)
    return kernel
