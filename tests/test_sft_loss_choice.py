"""sft's loss = "auto": the full-logits loss on a CPU with memory to spare (TRL's chunked loss
recomputes the LM head in backward: twice the Quickstart's step time), chunked on a GPU or
where the logits would crowd the free memory."""

from __future__ import annotations

from types import SimpleNamespace

import psutil

from petune_plugins.tasks.sft import loss_memory

GEMMA = SimpleNamespace(vocab_size=262144)  # the Quickstart's model: 4 x 128 tokens give 1.5 GiB of logits


def free_memory(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(gib * 2**30)))


def test_a_cpu_with_memory_to_spare_uses_the_full_logits(monkeypatch):
    free_memory(monkeypatch, 20)
    assert loss_memory("auto", 4, 128, GEMMA, device="cpu") == "logits"


def test_a_cpu_short_of_memory_and_a_gpu_use_the_chunked_loss(monkeypatch):
    free_memory(monkeypatch, 4)
    assert loss_memory("auto", 4, 128, GEMMA, device="cpu") == "chunked"
    free_memory(monkeypatch, 20)
    assert loss_memory("auto", 4, 128, GEMMA, device="cuda") == "chunked"
    assert loss_memory("auto", 4, 128, GEMMA, device="cpu") == "logits"
    assert loss_memory("auto", 64, 2048, GEMMA, device="cpu") == "chunked"  # 384 GiB of logits


def test_an_explicit_choice_is_kept(monkeypatch):
    free_memory(monkeypatch, 20)
    assert loss_memory("chunked", 4, 128, GEMMA, device="cpu") == "chunked"
    assert loss_memory("full", 4, 128, GEMMA, device="cuda") == "logits"
