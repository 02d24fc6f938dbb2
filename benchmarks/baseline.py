"""The baseline: a plain transformers + peft (+ bitsandbytes) training loop, written the
way a careful user would write it from the libraries' documentation — same model folder,
batch, sequence length, dtype, gradient checkpointing, optimizer (torch AdamW, lr 2e-4, no
weight decay), linear schedule, gradient clipping at 1.0 and bf16 autocast on GPU.

Per strategy:

* full — plain transformers, every weight trains.
* lora — ``peft.get_peft_model`` with ``LoraConfig(r=16, alpha=32, dropout=0.05, "all-linear")``.
* qlora — the same on a model loaded with ``BitsAndBytesConfig(load_in_4bit, nf4, double
  quant, bf16 compute)``; *without* ``peft.prepare_model_for_kbit_training`` (it upcasts
  every non-quantised weight to fp32: slower and bigger), unless the case asks for it
  (``baseline_kbit_prep``).
* adapters — peft has no bottleneck adapters, so the baseline is the *same hand-written
  module* (``petune_plugins.strategies.adapters.add_adapters``) trained in this plain loop:
  it measures petune's pipeline around the adapters, not the adapters themselves.
* prompt_tuning — ``PromptTuningConfig`` with 20 virtual tokens initialised from text.

Task heads: the classification head (and BERT's pooler, which the masked-LM checkpoint
lacks) train in full and are saved with the adapter, as petune does (``modules_to_save``).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from .harness import (
    LEARNING_RATE,
    MAX_GRAD_NORM,
    STRATEGY_OPTIONS,
    Case,
    Meter,
    StepClock,
    dir_size,
    result_record,
    set_threads,
    synthetic_rows,
)
from .shapes import SHAPES, model_path

PROMPT_INIT_TEXT = "Read the following text and do the task it calls for."


def run(case: Case) -> dict:
    meter = Meter(case.device)
    meter.start()
    set_threads(case)
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        get_linear_schedule_with_warmup,
    )

    shape = SHAPES[case.shape]
    path = model_path(shape)
    options = {**STRATEGY_OPTIONS[case.strategy], **case.strategy_options}
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    causal = shape.family == "llama"
    heads = None if causal else ["classifier", "pooler"]  # the new head, and BERT's pooler (not in the checkpoint)
    torch.manual_seed(42)

    # -- model --------------------------------------------------------------------------------
    load = {"dtype": dtype}
    if case.strategy == "qlora":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=options["quant_type"],
            bnb_4bit_use_double_quant=options["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, options["compute_dtype"]),
            llm_int8_skip_modules=["lm_head"] if causal else ["classifier", "pooler.dense"])
        load["device_map"] = {"": device}
    if causal:
        model = AutoModelForCausalLM.from_pretrained(path, **load)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **load)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    task_type = "CAUSAL_LM" if causal else "SEQ_CLS"
    if case.strategy == "full":
        pass
    elif case.strategy in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if case.strategy == "qlora" and case.baseline_kbit_prep:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.gradient_checkpointing)
        elif case.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            task_type=task_type, r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
            target_modules=options["target_modules"], modules_to_save=heads))
    elif case.strategy == "adapters":
        from petune_plugins.strategies.adapters import add_adapters

        hidden = model.config.hidden_size
        add_adapters(model, {"config": options["config"], "hidden_size": hidden,
                             "bottleneck_size": max(1, hidden // options["reduction_factor"]),
                             "non_linearity": options["non_linearity"], "residual": True,
                             "head_modules": [] if causal else ["classifier", "bert.pooler.dense"]})
    elif case.strategy == "prompt_tuning":
        from peft import PromptTuningConfig, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=options["num_virtual_tokens"], prompt_tuning_init="TEXT",
            prompt_tuning_init_text=PROMPT_INIT_TEXT, tokenizer_name_or_path=str(path), modules_to_save=heads))
    else:
        raise ValueError(f"no baseline for strategy {case.strategy!r}")
    if case.strategy != "qlora":
        model.to(device)

    # -- data ---------------------------------------------------------------------------------
    rows = synthetic_rows(case, AutoConfig.from_pretrained(path).vocab_size, shape.family, tokenizer.pad_token_id)
    names = list(rows)
    dataset = TensorDataset(*(torch.tensor(rows[n]) for n in names))
    loader = DataLoader(dataset, batch_size=case.batch, shuffle=True, drop_last=True, pin_memory=cuda)

    # -- training -----------------------------------------------------------------------------
    from petune.api import count_parameters  # the same counting as the petune side

    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=case.total_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == torch.bfloat16 else nullcontext()

    clock = StepClock(case.device)
    losses = []
    memory = {}
    timed = case.warmup + case.steps
    model.train()
    meter.train_begin()
    clock.begin()
    for step, tensors in enumerate(loader):
        if step == timed:  # the untimed probe step (CPU): every tensor allocation recorded
            meter.probe.start()
        batch = {n: t.to(device, non_blocking=True) for n, t in zip(names, tensors)}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            losses.append(loss.item())
        if step < timed:
            clock.step_end()
        if step + 1 == timed:
            memory.update(meter.read())
    memory.update(meter.probe.stop())

    artifact = Path(case.work_dir) / "artifact"
    if case.strategy == "adapters":
        from safetensors.torch import save_file

        artifact.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  artifact / "adapter_model.safetensors")
    else:
        model.save_pretrained(artifact)
    return result_record(case, clock=clock, memory=memory, trainable=trainable, total=total,
                         artifact_bytes=dir_size(artifact), losses=losses,
                         extra={"trainer": "plain loop"})
