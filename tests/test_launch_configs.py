"""Every Accelerate launch config loads through Accelerate's own loader and says what it claims.

No GPU is needed: the files are read and turned into launcher arguments (``accelerate launch``'s
own argument processing) and, for FSDP, into the plugin and its wrap policy on a tiny model;
nothing is launched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {"cpu.yaml", "cpu-2proc.yaml", "gpu.yaml", "multi-gpu.yaml",
                                         "fsdp.yaml", "multi-node.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_loads_with_accelerates_loader(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls
    assert isinstance(cfg, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)).num_processes == cfg.num_processes
    # Accelerate checks the top-level keys but copies nested ones (fsdp_config, ...) onto the
    # launcher's arguments without a check: a misspelt key would be ignored silently.
    dests = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("fp8_config", "fp8_"), ("dynamo_config", "dynamo_")):
        for key in getattr(cfg, section) or {}:
            name = key if key.startswith(prefix) else prefix + key
            assert name in dests, f"{path.name}: {section}.{key} is not an `accelerate launch` option"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_and_no_mixed_precision(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} should start with comments saying what it is for"
    command = f"accelerate launch --config_file configs/accelerate/{path.name} "
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert command in text or command in readme, f"{path.name}: its command should be in the file or README.md"
    # mixed precision comes from params.yaml (lmcore passes it to Accelerator, which wins)
    assert yaml.safe_load(text).get("mixed_precision", "no") == "no"


def launcher_args(*argv: str):
    """``accelerate launch``'s arguments after it has merged the config file, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*argv, "-m", "lmcore.cli", "pretrain"])
    args, _, _ = _validate_launch_command(args)
    return args


def cfg_arg(name: str) -> str:
    return str(CONFIG_DIR / name)


def test_cpu_configs():
    one = launcher_args("--config_file", cfg_arg("cpu.yaml"))
    assert (one.num_processes, one.multi_gpu, one.use_cpu) == (1, False, True)
    two = launcher_args("--config_file", cfg_arg("cpu-2proc.yaml"))
    assert (two.num_processes, two.multi_gpu, two.use_cpu) == (2, True, True)


def test_gpu_configs():
    gpu = launcher_args("--config_file", cfg_arg("gpu.yaml"))
    assert (gpu.num_processes, gpu.multi_gpu, gpu.use_fsdp, gpu.use_cpu) == (1, False, False, False)
    ddp = launcher_args("--config_file", cfg_arg("multi-gpu.yaml"))
    assert (ddp.num_processes, ddp.num_machines, ddp.multi_gpu, ddp.use_cpu) == (8, 1, True, False)
    four = launcher_args("--config_file", cfg_arg("multi-gpu.yaml"), "--num_processes", "4")
    assert four.num_processes == 4  # the command line overrides the file


def test_multi_node_config():
    node0 = launcher_args("--config_file", cfg_arg("multi-node.yaml"))
    assert (node0.num_machines, node0.num_processes, node0.machine_rank, node0.multi_gpu) == (2, 16, 0, True)
    assert node0.main_process_port == 29500
    node1 = launcher_args("--config_file", cfg_arg("multi-node.yaml"), "--machine_rank", "1",
                          "--main_process_ip", "10.0.0.1")
    assert (node1.machine_rank, node1.main_process_ip) == (1, "10.0.0.1")


def test_fsdp_config_wraps_lmcore_blocks(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    from lmcore.model.decoder import Block, Decoder, DecoderConfig

    args = launcher_args("--config_file", cfg_arg("fsdp.yaml"))
    assert args.use_fsdp and args.num_processes == 8
    assert int(args.fsdp_version) == 2
    assert args.fsdp_transformer_layer_cls_to_wrap == Block.__name__
    # the environment the launcher gives each process, and the plugin Accelerator builds from it
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Block"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full shard
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    plugin.set_auto_wrap_policy(Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)))
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Block}


@pytest.mark.parametrize("in_code, from_launcher", [("no", "bf16"), ("bf16", "no")])
def test_mixed_precision_in_code_wins_over_launcher(monkeypatch, in_code, from_launcher):
    """`accelerate launch` passes the config's / --mixed_precision value as ACCELERATE_MIXED_PRECISION;
    the Accelerator lmcore builds with params.yaml's value (make_accelerator) wins."""
    from accelerate.state import AcceleratorState

    from lmcore.train.accel import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", from_launcher)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(True)
    try:
        assert make_accelerator(in_code).mixed_precision == in_code
    finally:
        AcceleratorState._reset_state(True)
