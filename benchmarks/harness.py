"""What both sides of a benchmark share: the case description, synthetic data, the memory
meter, the step clock and the result record. Measuring the same way on both sides is
what makes the petune/baseline ratios fair.

Memory
    GPU: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the whole
    process (load + train), as a user sees it. CPU: growth of the resident set over the
    process's RSS before the model loads, read from the kernel's high-water mark
    (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs): exact, no
    sampling thread. ``peak`` covers load + train, ``train_peak`` only the training steps.
Time
    Each step ends when its optimizer step (and zero_grad) is done; on GPU the clock waits
    for the device. A step's time is the gap between consecutive step ends, so it includes
    the data loader, forward, backward, clipping, optimizer, scheduler, logging and every
    callback — everything that happens once per step. The first ``warmup`` steps are dropped;
    the median of the rest is reported.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0


@dataclass
class Case:
    """One configuration on one side. JSON-serialisable (it crosses a process boundary)."""

    shape: str
    strategy: str
    side: str  # "petune" | "baseline"
    batch: int
    seq: int
    steps: int = 6  # measured steps (after warm-up)
    warmup: int = 2
    gradient_checkpointing: bool = False
    device: str = "cpu"
    optimizer: str = "adamw_torch"
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    work_dir: str = ""  # scratch folder (adapter saved here to measure its size)
    baseline_kbit_prep: bool = False  # baseline qlora: call peft's prepare_model_for_kbit_training
    #: petune-side experiment: "" (petune as it is) or "plain-loss" (the SFT trainer computes the
    #: loss with the model's own cross-entropy instead of TRL's fused, chunked LM head)
    variant: str = ""
    strategy_options: dict = field(default_factory=dict)
    #: "" trains on synthetic fixed-length rows; a path to an Alpaca JSON file makes this a
    #: real-length case: those examples, tokenized, cut at ``seq`` (= max_length), loss on the answers
    data: str = ""
    #: each side with its own defaults instead of the options spelled out below (the Quickstart
    #: case): petune's recipe defaults (compute_dtype auto); the baseline as bitsandbytes'
    #: documentation writes it (no compute dtype: float32; no load dtype: the checkpoint's)
    own_defaults: bool = False

    @property
    def probe(self) -> bool:
        """CPU runs add one last step, not timed, that records every tensor allocation
        (the CPU's counterpart of CUDA's max_memory_allocated)."""
        return not self.device.startswith("cuda")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + int(self.probe)

    @property
    def label(self) -> str:
        side = f"{self.side}[{self.variant}]" if self.variant and self.side == "petune" else self.side
        kind = f" real lengths ≤{self.seq}" if self.data else f"×{self.seq}"
        return f"{self.shape}/{self.strategy}/{side} b{self.batch}{kind}"


#: the options both sides use for each strategy (the petune defaults, spelled out)
STRATEGY_OPTIONS = {
    "full": {},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "qlora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
              "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
    "adapters": {"config": "pfeiffer", "reduction_factor": 16, "non_linearity": "relu"},
    "prompt_tuning": {"method": "prompt", "num_virtual_tokens": 20},
}
STRATEGIES = tuple(STRATEGY_OPTIONS)


# -- synthetic data ---------------------------------------------------------------------------
def synthetic_rows(case: Case, vocab_size: int, family: str, pad_token_id: int | None) -> dict[str, list]:
    """Fixed-length rows (no padding), seeded: the same data on both sides.

    llama (causal LM): input_ids with labels = input_ids (loss on every token);
    bert (classification): input_ids, attention_mask and a label out of two."""
    import torch

    rows = case.batch * case.total_steps
    g = torch.Generator().manual_seed(1234)
    low = 5 if vocab_size > 10 else 0  # keep clear of the special tokens
    ids = torch.randint(low, vocab_size, (rows, case.seq), generator=g)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = low
    data = {"input_ids": ids.tolist()}
    if family == "llama":
        data["labels"] = ids.tolist()
    else:
        data["attention_mask"] = [[1] * case.seq for _ in range(rows)]
        data["labels"] = torch.randint(0, 2, (rows,), generator=g).tolist()
    return data


# -- memory -------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE)}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Peak memory of this process, from ``start()`` (before the model loads)."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.probe = TensorProbe()
        self.rss0 = 0
        self.exact = True
        self.load_peak = 0
        self.train_begin_rss = 0

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.exact = _reset_hwm()
        self.rss0 = _proc_status()["VmRSS"]

    def train_begin(self) -> None:
        """Called once the model is loaded and wrapped, before the first step."""
        status = _proc_status()
        self.load_peak = status["VmHWM"] - self.rss0
        self.train_begin_rss = status["VmRSS"] - self.rss0
        if self.cuda:
            import torch

            self.cuda_load_peak = torch.cuda.max_memory_allocated()
            self.cuda_load_allocated = torch.cuda.memory_allocated()
        if self.exact:
            _reset_hwm()

    def read(self) -> dict:
        status = _proc_status()
        train_peak = status["VmHWM"] - self.rss0
        out = {
            "rss_growth_peak": max(train_peak, self.load_peak),
            "rss_growth_train_peak": train_peak,
            "rss_growth_load_peak": self.load_peak,
            "rss_after_load": self.train_begin_rss,
            "rss_exact": self.exact,
        }
        if self.cuda:
            import torch

            out.update(cuda_max_allocated=torch.cuda.max_memory_allocated(),
                       cuda_max_reserved=torch.cuda.max_memory_reserved(),
                       cuda_load_peak=self.cuda_load_peak, cuda_after_load=self.cuda_load_allocated)
        # what the table compares: device memory on GPU, RSS growth on CPU
        out["peak_bytes"] = out["cuda_max_allocated"] if self.cuda else out["rss_growth_peak"]
        return out


# -- time -----------------------------------------------------------------------------------
class StepClock:
    """Records wall-clock and process CPU time at the end of every optimizer step.

    On a shared CPU, other processes stretch wall-clock steps at random; the process's CPU
    time (all its threads) is what the step itself costs, so CPU rows report both."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.t0 = self.c0 = None
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.t0 = self._now()
        self.c0 = time.process_time()

    def step_end(self) -> None:
        self.ends.append(self._now())
        self.cpu_ends.append(time.process_time())

    @staticmethod
    def _gaps(start, ends) -> list[float]:
        marks = [start, *ends]
        return [b - a for a, b in itertools.pairwise(marks)]

    def summary(self, warmup: int, steps: int, tokens_per_step: int) -> dict:
        times = self._gaps(self.t0, self.ends)
        cpu = self._gaps(self.c0, self.cpu_ends)
        measured = times[warmup:warmup + steps] or times
        measured_cpu = cpu[warmup:warmup + steps] or cpu
        median = statistics.median(measured) if measured else float("nan")
        return {"step_times": times, "step_cpu_times": cpu, "median_step_s": median,
                "median_step_cpu_s": statistics.median(measured_cpu) if measured_cpu else float("nan"),
                "tokens_per_s": tokens_per_step / median if measured and median > 0 else 0.0,
                "measured_steps": len(measured)}


class TokenCounter:
    """Tokens of every batch a side trains on, for real-length cases: ``useful`` are the
    loss-bearing ones (a label other than -100 after the causal shift: what the model learns
    from), ``real`` the tokens of the examples (padding excluded), ``computed`` every position
    the model runs (padding included)."""

    def __init__(self):
        self.steps: list[dict] = []

    def add(self, batch) -> None:
        labels = batch["labels"]
        mask = batch.get("attention_mask")
        self.steps.append({"useful": int((labels[..., 1:] != -100).sum()),
                           "real": int(mask.sum()) if mask is not None else int(labels.numel()),
                           "computed": int(labels.numel()), "rows": int(labels.shape[0])})

    def summary(self, clock: StepClock, warmup: int, steps: int) -> dict:
        """Useful tokens per second (and per CPU-second) over the measured steps: their tokens
        over their total time, since a step's cost follows its own batch's length."""
        times = clock._gaps(clock.t0, clock.ends)[warmup:warmup + steps]
        cpu = clock._gaps(clock.c0, clock.cpu_ends)[warmup:warmup + steps]
        counted = self.steps[warmup:warmup + len(times)]
        total = {k: sum(s[k] for s in counted) for k in ("useful", "real", "computed")}
        return {"token_steps": self.steps, "useful_tokens": total["useful"],
                "useful_tokens_per_s": total["useful"] / sum(times) if times and sum(times) > 0 else 0.0,
                "useful_tokens_per_cpu_s": total["useful"] / sum(cpu) if cpu and sum(cpu) > 0 else 0.0,
                "computed_tokens_per_step": total["computed"] / len(counted) if counted else 0.0,
                "pad_share": 1 - total["real"] / total["computed"] if total["computed"] else 0.0,
                "useful_share": total["useful"] / total["computed"] if total["computed"] else 0.0}


class TensorProbe:
    """Peak bytes of live CPU tensors during one step: the tensors alive when it starts
    (found through the garbage collector) plus the highest running total of the
    allocations and frees the torch profiler records in the step."""

    def __init__(self):
        self.profiler = None
        self.live_start = 0
        self.result: dict = {}

    @staticmethod
    def live_tensor_bytes() -> int:
        import gc

        import torch

        storages = {}
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # noqa: BLE001 — odd subclasses, freed storages: not tensors to count
                continue
        return sum(storages.values())

    def start(self) -> None:
        import warnings

        from torch.profiler import ProfilerActivity, profile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.live_start = self.live_tensor_bytes()
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def stop(self) -> dict:
        if self.profiler is None:
            return {}
        self.profiler.__exit__(None, None, None)
        # every allocation and free, with its time (the raw kineto "[memory]" records)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        self.profiler = None
        self.result = {"tensor_live_at_step_start": self.live_start, "tensor_peak": self.live_start + peak}
        return self.result


def count_training_steps(trainer, counter: TokenCounter) -> None:
    """Record the tokens of every batch a transformers ``Trainer`` trains on (one call of
    ``training_step`` per optimizer step: the suite never accumulates gradients)."""
    inner = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        counter.add(inputs)
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def trainer_clock_callback(case: Case, clock: StepClock, meter: Meter, memory: dict):
    """The same clock as a ``TrainerCallback`` for the petune side. Fills ``memory`` at the
    end of the last timed step, before the probe step and anything after training (saving)
    can add to the peak."""
    from transformers import TrainerCallback

    timed = case.warmup + case.steps

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.train_begin()
            clock.begin()

        def on_step_begin(self, args, state, control, **kwargs):
            if case.probe and state.global_step == timed:
                meter.probe.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step <= timed:
                clock.step_end()
            if state.global_step == timed:
                memory.update(meter.read())
            if case.probe and state.global_step == timed + 1:
                memory.update(meter.probe.stop())

    return Clock()


# -- results --------------------------------------------------------------------------------
def model_dtypes(model) -> dict:
    """What a model computes in: its quantised layers' compute dtype (bitsandbytes 4-bit or a
    GGUF file's blocks; None without any), their kind, and the dtype of its other weights (the
    input embedding's)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")  # imported wherever a model holds 4-bit layers
    gguf = sys.modules.get("petune_plugins.strategies.gguf_backend")  # likewise for GGUF blocks
    kinds = [(bnb.nn.Linear4bit, "4-bit")] if bnb else []
    kinds += [(gguf.GGUFLinear, "GGUF blocks")] if gguf else []
    layer, kind = next(((m, k) for m in model.modules() for cls, k in kinds if isinstance(m, cls)), (None, None))
    return {"compute_dtype": str(layer.compute_dtype).removeprefix("torch.") if layer is not None else None,
            "quantised_as": kind,
            "weights_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")}


def dir_size(path: Path) -> int:
    """Bytes of a saved artifact: a file, or a folder (petune's own count)."""
    from petune.artifacts import folder_size

    path = Path(path)
    return path.stat().st_size if path.is_file() else folder_size(path)


def set_threads(case: Case) -> None:
    if case.threads:
        import torch

        torch.set_num_threads(case.threads)


def result_record(case: Case, *, clock: StepClock, memory: dict, trainable: int, total: int, artifact_bytes: int,
                  losses: list[float], extra: dict | None = None) -> dict:
    import torch

    record = {"case": asdict(case), "ok": True, **clock.summary(case.warmup, case.steps, case.batch * case.seq), **memory,
              "trainable_params": trainable, "total_params": total, "artifact_bytes": artifact_bytes,
              "losses": losses, "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
    record.update(extra or {})
    return record
