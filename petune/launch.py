"""`petune run --num-processes N`: start the same command under accelerate's launcher.

accelerate (torchrun underneath) starts N processes, each running `python -m petune run ...`;
the HF Trainer then does DDP, or FSDP / DeepSpeed from the recipe's [distributed] section.
On a machine without CUDA the processes talk over gloo on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

from petune.console import err


def inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def strip_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        out.append(arg)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, argv: list[str]) -> tuple[list[str], dict]:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on the CPU
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", env.get("PETUNE_MAIN_PORT") or str(free_port()),
           "-m", "petune", *strip_num_processes(argv)]
    return cmd, env


def relaunch(processes: int, argv: list[str]) -> int:
    cmd, env = launch_command(processes, argv)
    err.print(f"[dim]starting {processes} processes with accelerate: {' '.join(cmd[2:])}[/]", soft_wrap=True)
    return subprocess.run(cmd, env=env, check=False).returncode
