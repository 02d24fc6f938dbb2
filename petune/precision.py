"""Which floating-point type to compute in, chosen for the hardware.

bfloat16 is only fast where the hardware has it: CUDA GPUs from Ampere on, and CPUs with
AVX512-BF16 or AMX. Elsewhere torch emulates it, and a bf16 matmul on an AVX2 laptop runs
about 200× slower than in float32 — so "auto" never picks a dtype the device would emulate,
and an explicit one that will be emulated is named in the plan with what it costs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """A dtype name ("float32", "bfloat16", "float16") and why it was picked."""

    dtype: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reason})"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def cuda_device(device=None) -> bool:
    """Whether ``device`` (default: where this process trains) is a CUDA GPU."""
    if device is None:
        import torch

        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def cpu_capability() -> str:
    """torch's name for the CPU's widest vector unit (AVX2, AVX512, ...)."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86, as torch
    reports it; oneDNN's own check elsewhere, e.g. Arm's BF16 extension). The environment
    variable ``PETUNE_CPU_BF16`` = 0 or 1 overrides the detection (a CPU that reports bf16
    but is slow at it; the test suite, which computes the same on every CPU)."""
    import os
    import platform

    import torch

    forced = os.environ.get("PETUNE_CPU_BF16", "").strip().lower()
    if forced in ("0", "1", "no", "yes", "false", "true"):
        return forced in ("1", "yes", "true")

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return False  # oneDNN says True on plain AVX-512 too, where bf16 is emulated
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def auto(device=None) -> Choice:
    """The fastest dtype the device computes natively: bfloat16 on CUDA GPUs and CPUs that
    have it, float16 on older CUDA GPUs, float32 otherwise."""
    if cuda_device(device):
        if cuda_bf16():
            return Choice("bfloat16", "auto: CUDA GPU with bf16")
        return Choice("float16", "auto: CUDA GPU without bf16")
    if cpu_native_bf16():
        return Choice("bfloat16", f"auto: CPU with native bf16, {cpu_capability()}")
    return Choice("float32", "auto: CPU without native bf16")


def auto_weights(device=None) -> Choice:
    """Like :func:`auto`, but never float16: weights that train in float16 without a loss
    scaler overflow, so older GPUs keep float32 weights and get float16 through autocast."""
    choice = auto(device)
    if choice.dtype == "float16":
        return Choice("float32", "auto: CUDA GPU without bf16, float16 through autocast only")
    return choice


def resolve(name: str, device=None, *, weights: bool = False) -> Choice:
    """A recipe's dtype setting: "auto" resolved for the device, anything else as given."""
    if name == "auto":
        return auto_weights(device) if weights else auto(device)
    return Choice(name, "set in the recipe")


def training_precision(setting: str, device=None) -> str:
    """[train] precision ("auto", "fp32", "bf16", "fp16") resolved for the device: "auto"
    trains in the dtype the device computes natively."""
    if setting != "auto":
        return setting
    return {"bfloat16": "bf16", "float16": "fp16"}.get(auto(device).dtype, "fp32")


def emulated(dtype: str, device=None) -> bool:
    """Whether computing in ``dtype`` on ``device`` would be emulated in software."""
    if cuda_device(device):
        return dtype == "bfloat16" and not cuda_bf16()
    if dtype == "bfloat16":
        return not cpu_native_bf16()
    if dtype == "float16":
        import torch

        return not getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()
    return False


@functools.cache
def slowdown(dtype: str) -> float:
    """How many times slower a matmul in ``dtype`` runs than in float32 on this CPU (a
    one-off measurement of about a tenth of a second)."""
    import time

    import torch

    a, b = torch.randn(128, 256), torch.randn(256, 256)

    def seconds(x, y) -> float:
        x @ y  # warm-up
        runs = []
        for _ in range(3):  # the fastest of three: another process may hold the core for one
            started = time.perf_counter()
            x @ y
            runs.append(time.perf_counter() - started)
        return min(runs)

    dt = getattr(torch, dtype)
    return seconds(a.to(dt), b.to(dt)) / max(seconds(a, b), 1e-7)


def emulation_warning(dtype: str, where: str, device=None) -> str | None:
    """A plan line when ``dtype`` would be emulated on the device, else None."""
    if not emulated(dtype, device):
        return None
    if cuda_device(device):
        return f"{where} = {dtype}: this GPU has no {dtype} arithmetic; set \"auto\" or \"float16\""
    return (f"{where} = {dtype} is emulated on this CPU ({cpu_capability()}, no native {dtype}): "
            f"matmuls run about {slowdown(dtype):.0f}× slower than float32; set \"auto\" or \"float32\"")


def describe() -> list[tuple[str, str]]:
    """Rows for `petune env`: what the CPU computes natively and what "auto" picks."""
    rows = [("cpu capability", cpu_capability()),
            ("cpu native bf16", "yes" if cpu_native_bf16() else "no (emulated)"),
            ("auto dtype (cpu)", str(auto("cpu")))]
    if cuda_device():
        rows.append(("auto dtype (cuda)", str(auto("cuda"))))
    return rows
