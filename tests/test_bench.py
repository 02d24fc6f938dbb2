"""The benchmark suite (benchmarks/, `petune bench`): planning, reporting, and a smoke run of
every strategy on the tiny random models, each side in its own process."""

from __future__ import annotations

import json

import pytest

from benchmarks import suite as bench

STRATEGIES = ("full", "lora", "qlora", "adapters", "prompt_tuning")


def test_smoke_plan_pairs_every_strategy_on_both_tiny_models():
    pairs = bench.plan(smoke=True)
    assert len(pairs) == 10
    assert {(p.shape, p.strategy) for p, _ in pairs} == {(s, x) for s in ("tiny-llama", "tiny-bert") for x in STRATEGIES}
    for petune_case, baseline_case in pairs:
        assert (petune_case.side, baseline_case.side) == ("petune", "baseline")
        same = {k: v for k, v in vars(petune_case).items() if k not in ("side", "work_dir", "variant")}
        assert same == {k: v for k, v in vars(baseline_case).items() if k not in ("side", "work_dir", "variant")}
        assert petune_case.device == "cpu" and petune_case.threads == 1
        assert petune_case.gradient_checkpointing == (petune_case.shape == "tiny-llama")


def test_plan_refuses_unknown_names():
    from petune.errors import UserError

    with pytest.raises(UserError, match="unknown shape"):
        bench.plan(shapes=["gpt-5"])
    with pytest.raises(UserError, match="unknown strateg"):
        bench.plan(smoke=True, strategies=["dora"])


def fake_row(strategy: str, side: str, step: float, peak: int, predicted: int, tensor_peak: int = 0) -> dict:
    return {"case": {"shape": "tiny-llama", "strategy": strategy, "side": side, "batch": 2, "seq": 8, "device": "cpu",
                     "variant": ""},
            "ok": True, "median_step_s": step, "median_step_cpu_s": step, "tokens_per_s": 16 / step,
            "peak_bytes": peak, "tensor_peak": tensor_peak or peak, "trainable_params": 10, "total_params": 100,
            "artifact_bytes": 1000,
            "predicted": {"peak": predicted, "parts": {"runtime": 0}, "details": {"tensor_peak": predicted}}}


def test_summary_ratios_and_estimate_errors(tmp_path):
    rows = [fake_row("lora", "petune", 0.11, 200, 220), fake_row("lora", "baseline", 0.10, 100, 100),
            fake_row("full", "petune", 0.20, 400, 300), fake_row("full", "baseline", 0.20, 400, 400)]
    s = bench.summary(rows)
    assert s["pairs"] == 2 and s["failed"] == 0
    assert s["median_step_time_ratio"] == pytest.approx((1.1 + 1.0) / 2)
    assert s["max_abs_estimate_error"] == pytest.approx(0.25)
    failed = dict(rows[1], ok=False, error="boom")
    assert bench.summary([rows[0], failed])["failed"] == 1

    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench.results_table(rows + [rows[0], failed], "t"))
    text = console.export_text()
    assert "tiny-llama / lora" in text and "1.10" in text and "failed" in text and "+10%" in text
    assert bench.write_chart(rows, tmp_path / "c.png", "t").stat().st_size > 1000


@pytest.mark.slow
def test_smoke_bench_runs_every_strategy_against_the_baseline(tmp_path):
    results = bench.run_suite(smoke=True, out_dir=tmp_path, progress=False)
    rows = results["rows"]
    assert len(rows) == 20
    failures = [f"{r['case']['shape']}/{r['case']['strategy']}/{r['case']['side']}: {r.get('error')}"
                for r in rows if not r.get("ok")]
    assert not failures, failures
    seen = {(r["case"]["shape"], r["case"]["strategy"], r["case"]["side"]) for r in rows}
    assert seen == {(s, x, side) for s in ("tiny-llama", "tiny-bert") for x in STRATEGIES
                    for side in ("petune", "baseline")}
    for r in rows:
        for key in ("median_step_s", "median_step_cpu_s", "tokens_per_s", "peak_bytes", "tensor_peak",
                    "trainable_params", "total_params", "artifact_bytes"):
            assert r[key] > 0, (r["case"], key)
        assert r["trainable_params"] <= r["total_params"]
        assert r["predicted"]["peak"] > 0, r["predicted"]
        assert len(r["step_times"]) == r["case"]["warmup"] + r["case"]["steps"]
    for p, b in bench.pair_rows(rows):  # both sides train the same parameters
        assert p["trainable_params"] == b["trainable_params"], p["case"]
        assert p["total_params"] == b["total_params"], p["case"]
    assert rows[0]["trainer"] == "SFTTrainer" and rows[1]["trainer"] == "plain loop"

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["pairs"] == 10 and saved["environment"]["versions"]["torch"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_max_context_search_starts_from_the_estimate_and_bisects(monkeypatch):
    from benchmarks.harness import Case

    limit_that_fits = 22_000
    monkeypatch.setattr(bench, "predicted_max_seq", lambda case, capacity, **kw: 24576)
    monkeypatch.setattr(bench, "predict", lambda case: {"peak": case.seq})

    class FakeRunner:
        def __init__(self):
            self.seqs = []

        def run(self, case):
            self.seqs.append(case.seq)
            assert case.batch == 1
            ok = case.seq <= limit_that_fits
            return {"ok": ok, "peak_bytes": case.seq * 1000 if ok else None, "error": None if ok else "OOM"}

    runner = FakeRunner()
    base = Case(shape="llama-3-8b", strategy="qlora", side="petune", batch=2, seq=2048, device="cuda", work_dir="/tmp/w")
    found = bench.max_context_search(base, runner, capacity=80 * 2**30, progress=False)
    assert runner.seqs[:2] == [4096, 24576]  # the check, then the estimate's guess
    assert found["check"]["ok"] and found["max_seq"] <= limit_that_fits < found["first_failing_seq"]
    assert found["first_failing_seq"] - found["max_seq"] <= 2048 and len(runner.seqs) <= 6


def test_trainer_counts_parameters_once_for_its_flop_counter(tiny_bert_path, tmp_path):
    """count_parameters_once replaces the Trainer's per-step parameter walk with one count: same number."""
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from petune.trainer_setup import count_parameters_once

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_path, num_labels=2)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    inputs = {"input_ids": torch.ones(4, 16, dtype=torch.long)}
    expected = trainer.floating_point_ops(inputs)
    calls = []
    original = model.num_parameters
    model.num_parameters = lambda **kw: calls.append(kw) or original(**kw)
    count_parameters_once(trainer)
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3 and expected > 0
    assert len(calls) == 1
    assert trainer.floating_point_ops({"labels": torch.ones(4)}) == 0


# -- CUDA-safe workers ---------------------------------------------------------------------------
def test_cuda_cases_are_spawned_never_forked(tmp_path, monkeypatch):
    """bitsandbytes initialises CUDA when peft imports it, so a case forked from a server that
    imported peft dies on a GPU machine: CUDA cases get a fresh interpreter each."""
    import os
    import subprocess

    from benchmarks import worker
    from benchmarks.harness import Case

    assert worker.start_method("cuda") == "spawn" and worker.start_method("cuda:1") == "spawn"
    assert worker.start_method("cpu") == ("fork" if hasattr(os, "fork") else "spawn")

    def no_fork():
        raise AssertionError("forked for a CUDA case")

    monkeypatch.setattr(os, "fork", no_fork, raising=False)
    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: launched.append(a) or no_fork())
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: launched.append(argv) or
                        subprocess.CompletedProcess(argv, 3))
    case = Case(shape="llama-3-8b", strategy="qlora", side="petune", batch=2, seq=2048, device="cuda",
                work_dir=str(tmp_path / "w"))
    with bench.CaseRunner(tmp_path / "logs", "cuda") as runner:
        assert runner.method == "spawn" and runner.server is None
        result = runner.run(case, timeout=5)
    assert len(launched) == 1 and "--case" in launched[0] and json.loads(launched[0][launched[0].index("--case") + 1])[
        "device"] == "cuda"
    assert not result["ok"] and "exited with code 3" in result["error"]


def test_fork_server_refuses_to_fork_once_cuda_is_initialised(tmp_path, monkeypatch):
    import io
    import sys
    import types

    from benchmarks import worker

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    job = {"case": {"shape": "tiny-llama"}, "result": str(tmp_path / "r.json"), "log": str(tmp_path / "l.log")}
    proto = io.StringIO()
    assert not worker.refuse_fork(job, proto) and proto.getvalue() == ""
    fake_torch.cuda.is_initialized = lambda: True
    assert worker.refuse_fork(job, proto)
    answered = [json.loads(line) for line in proto.getvalue().splitlines()]
    assert answered == [{"pid": 0}, {"done": 0, "status": 1}]
    result = json.loads((tmp_path / "r.json").read_text())
    assert not result["ok"] and "CUDA context" in result["error"]


# -- real-length cases -----------------------------------------------------------------------------
def test_real_length_plan_groups_petune_defaults_and_packing_with_one_baseline(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    groups = bench.plan_real_length(smoke=True, data=data, work_dir=tmp_path)
    assert len(groups) == 1  # tiny-bert is no instruction model: left out
    sides = [(c.side, c.variant) for c in groups[0]]
    assert sides == [("petune", ""), ("petune", "packing"), ("baseline", "")]
    for case in groups[0]:
        assert (case.shape, case.strategy, case.data, case.seq, case.batch) == (
            "tiny-llama", "lora", str(data.resolve()), 256, 4)
    assert len({c.work_dir for c in groups[0]}) == 3
    from petune.errors import UserError

    with pytest.raises(UserError, match="Alpaca data"):
        bench.find_real_data(tmp_path / "missing.json")


def test_token_counter_counts_loss_bearing_tokens_not_padding():
    import torch

    from benchmarks.harness import StepClock, TokenCounter

    counter = TokenCounter()
    # two rows padded to 6: the first has 5 real tokens, 2 loss-bearing; the second 3 real, 1 loss-bearing
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 9, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    counter.add({"labels": labels, "attention_mask": mask})
    counter.add({"labels": labels[:1, :5]})  # padding-free: every position is a real token
    assert counter.steps == [{"useful": 3, "real": 8, "computed": 12, "rows": 2},
                             {"useful": 2, "real": 5, "computed": 5, "rows": 1}]
    clock = StepClock("cpu")
    clock.t0 = clock.c0 = 0.0
    clock.ends, clock.cpu_ends = [1.0, 1.5], [2.0, 3.0]
    s = counter.summary(clock, warmup=0, steps=2)
    assert s["useful_tokens"] == 5 and s["useful_tokens_per_s"] == pytest.approx(5 / 1.5)
    assert s["useful_tokens_per_cpu_s"] == pytest.approx(5 / 3.0)
    assert s["pad_share"] == pytest.approx(1 - 13 / 17) and s["useful_share"] == pytest.approx(5 / 17)


def test_real_length_table_compares_useful_tokens_per_cpu_second():
    def row(side, variant, useful_cpu, pad):
        return {"case": {"shape": "small-llama", "strategy": "lora", "side": side, "variant": variant, "batch": 4,
                         "seq": 512, "device": "cpu"}, "ok": True, "useful_tokens_per_cpu_s": useful_cpu,
                "useful_tokens_per_s": useful_cpu / 2, "useful_share": 0.3, "pad_share": pad,
                "computed_tokens_per_step": 1800, "peak_bytes": 2**20}

    rows = [row("petune", "", 900.0, 0.2), row("petune", "packing", 1500.0, 0.0), row("baseline", "", 1000.0, 0.2)]
    text = bench.real_length_markdown(rows)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "petune (defaults)" in lines[1] and lines[1].endswith("| 0.90 |")
    assert "petune (packing)" in lines[2] and lines[2].endswith("| 1.50 |") and "| 0% |" in lines[2]
    assert lines[3].startswith("|  | baseline") and lines[3].endswith("|  |")
    failed = dict(rows[1], ok=False, error="boom")
    assert "failed: boom" in bench.real_length_markdown([rows[0], failed, rows[2]])


# -- the Quickstart case ---------------------------------------------------------------------------
def test_quickstart_case_is_the_recipe_with_each_side_defaults(tmp_path, monkeypatch):
    """`petune bench --cases quickstart` trains recipes/qlora_sft.toml's model, batch, length and
    [strategy]: petune with its defaults (compute_dtype auto), the plain loop with bitsandbytes'
    (compute dtype float32). Planned only: nothing loads the model."""
    import tomllib
    from pathlib import Path

    import torch

    from benchmarks import baseline, petune_side
    from benchmarks.shapes import SHAPES
    from petune import precision
    from petune.plugins import get_host
    from petune.recipe import validate

    toml = tomllib.loads((Path(__file__).resolve().parents[1] / "recipes" / "qlora_sft.toml").read_text())
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    (group,) = bench.plan_quickstart(work_dir=tmp_path)
    assert [(c.side, c.variant) for c in group] == [("petune", ""), ("petune", "plain-loss"), ("petune", "no-cpu-bf16"),
                                                     ("baseline", "")]
    assert SHAPES[group[0].shape].source == toml["model"]["name"] == "gemma-3-270m"
    quickstart = validate(toml, get_host(), check_paths=False)
    for case in group:
        assert case.own_defaults and case.device == "cpu" and case.strategy == toml["strategy"]["name"]
        assert (case.batch, case.seq) == (toml["train"]["batch_size"], toml["task"]["max_length"])
        assert case.strategy_options == {k: v for k, v in toml["strategy"].items() if k != "name"}
        assert case.gradient_checkpointing == quickstart.train.gradient_checkpointing
    assert len({c.work_dir for c in group}) == 4

    petune_recipe = validate(petune_side.recipe_data(group[0], "gemma-3-270m", tmp_path / "x.jsonl"), get_host(),
                             check_paths=False)
    assert petune_recipe.strategy.compute_dtype == "auto" and petune_recipe.model.dtype == "auto"
    load = baseline.load_kwargs(group[-1], group[-1].strategy_options, torch.float32, causal=True)
    config = load["quantization_config"]
    assert "dtype" not in load and config.bnb_4bit_compute_dtype == torch.float32  # bitsandbytes' default
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)  # float32 already: no second petune row
    assert [c.variant or c.side for c in bench.plan_quickstart(work_dir=tmp_path)[0]] == ["petune", "plain-loss",
                                                                                          "baseline"]


def test_quickstart_table_compares_each_side_with_the_baseline():
    def row(side, variant, cpu_s, peak, compute):
        return {"case": {"shape": "gemma-3-270m", "strategy": "qlora", "side": side, "variant": variant, "batch": 4,
                         "seq": 128}, "ok": True, "median_step_s": cpu_s * 1.1, "median_step_cpu_s": cpu_s,
                "peak_bytes": peak, "tensor_peak": peak // 2, "compute_dtype": compute, "weights_dtype": "bfloat16"}

    rows = [row("petune", "", 2.0, 2**30, "bfloat16"), row("baseline", "", 4.0, 2**31, "float32")]
    lines = [line for line in bench.quickstart_markdown(rows).splitlines() if line.startswith("| ")]
    assert "petune (defaults)" in lines[1] and "4-bit → bfloat16" in lines[1] and lines[1].endswith("| 0.50 | 0.50 |")
    assert "bitsandbytes' docs" in lines[2] and lines[2].endswith("|  |  |")
    assert "failed: boom" in bench.quickstart_markdown([dict(rows[0], ok=False, error="boom"), rows[1]])


def test_llamacpp_script_times_tokens_and_compares_greedy_answers():
    """benchmarks/llamacpp_generate.py's arithmetic (the script itself needs a trained run and llama.cpp)."""
    from benchmarks import llamacpp_generate as script

    stats = script.token_stats([1.5, 1.7, 1.9], started=1.0, ended=2.0, cpu_s=0.3)
    assert stats["tokens"] == 3 and stats["first_token_s"] == pytest.approx(0.5)
    assert stats["decode_ms_per_token"] == pytest.approx(200) and stats["call_ms_per_token"] == pytest.approx(1000 / 3)
    assert script._cut([5, 6, 1, 7], stop_ids=[1, 106]) == [5, 6]

    def side(answers):
        return {"answers": [{"ids": ids, "first_token_s": 0.1, "decode_ms_per_token": ms, "call_ms_per_token": ms,
                             "cpu_ms_per_token": ms} for ids, ms in answers]}

    c = script.compare(side([([1, 2, 3], 30.0), ([4, 5], 50.0)]), side([([1, 2, 3], 10.0), ([4, 9], 10.0)]))
    assert [a["identical"] for a in c["answers"]] == [True, False] and c["answers"][1]["common_prefix_tokens"] == 1
    assert c["decode_ms_per_token"]["ratio"] == pytest.approx(4.0)
