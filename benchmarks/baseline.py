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
  (``baseline_kbit_prep``). The Quickstart case (``own_defaults``) writes the load as
  bitsandbytes' documentation does instead: ``BitsAndBytesConfig(load_in_4bit, nf4, double
  quant)`` and nothing else, so it computes in the config's default float32 while the other
  weights keep the checkpoint's dtype (transformers' default ``dtype="auto"``).
* adapters — peft has no bottleneck adapters, so the baseline is the *same hand-written
  module* (``petune_plugins.strategies.adapters.add_adapters``) trained in this plain loop:
  it measures petune's pipeline around the adapters, not the adapters themselves.
* prompt_tuning — ``PromptTuningConfig`` with 20 virtual tokens initialised from text.

Real-length cases (``case.data``, an Alpaca JSON file): the examples as a careful user
prepares them — the Alpaca prompt, answer + EOS, labels -100 on the prompt, cut at
``max_length`` — in shuffled batches padded to their longest example by transformers'
``DataCollatorForSeq2Seq``.

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
    TokenCounter,
    dir_size,
    model_dtypes,
    result_record,
    set_threads,
    synthetic_rows,
)
from .shapes import SHAPES, model_path

PROMPT_INIT_TEXT = "Read the following text and do the task it calls for."
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")


def alpaca_examples(path: str, tokenizer, max_length: int) -> list[dict]:
    """Tokenized Alpaca examples with the loss on the answer only, cut at ``max_length``;
    an example whose answer is cut away entirely is dropped."""
    import json

    examples = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for record in json.loads(Path(path).read_text()):
        user = "\n\n".join(part for part in (record["instruction"], record.get("input") or "") if part.strip())
        prompt = f"{ALPACA_PREAMBLE}### Instruction:\n{user}\n\n### Response:\n"
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        if any(label != -100 for label in labels):
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


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
    load = load_kwargs(case, options, dtype, causal)
    from petune.api import load_pretrained

    # load_pretrained is from_pretrained for a folder of weights; for a GGUF base it reads the
    # file's tensors dequantised (transformers refuses bitsandbytes with gguf_file=, so a plain
    # script would first write a dequantised copy, then load that)
    if causal:
        model = load_pretrained(AutoModelForCausalLM, path, **load)
    else:
        model = load_pretrained(AutoModelForSequenceClassification, path, num_labels=2, **load)
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
    counter = TokenCounter() if case.data else None
    if case.data:
        from transformers import DataCollatorForSeq2Seq

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = alpaca_examples(case.data, tokenizer, case.seq)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
        loader = DataLoader(examples, batch_size=case.batch, shuffle=True, drop_last=True, collate_fn=collator,
                            pin_memory=cuda)
        passes = lambda: iter(loader)
    else:
        rows = synthetic_rows(case, AutoConfig.from_pretrained(path).vocab_size, shape.family, tokenizer.pad_token_id)
        names = list(rows)
        dataset = TensorDataset(*(torch.tensor(rows[n]) for n in names))
        tensors_loader = DataLoader(dataset, batch_size=case.batch, shuffle=True, drop_last=True, pin_memory=cuda)
        passes = lambda: ({n: t for n, t in zip(names, tensors)} for tensors in tensors_loader)

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
    for step, tensors in enumerate(_batches(passes, case.total_steps)):
        if step == timed:  # the untimed probe step (CPU): every tensor allocation recorded
            meter.probe.start()
        batch = {n: t.to(device, non_blocking=True) for n, t in tensors.items()}
        if counter is not None:
            counter.add(batch)
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
    extra = {"trainer": "plain loop", **model_dtypes(model)}
    if counter is not None:
        extra.update(counter.summary(clock, case.warmup, case.steps), examples=len(examples))
        extra["tokens_per_s"] = extra["useful_tokens_per_s"]
    return result_record(case, clock=clock, memory=memory, trainable=trainable, total=total,
                         artifact_bytes=dir_size(artifact), losses=losses, extra=extra)


def load_kwargs(case: Case, options: dict, dtype, causal: bool) -> dict:
    """``from_pretrained``'s arguments: the suite's shared dtype (and for QLoRA the shared
    quantisation options), or for the Quickstart case what bitsandbytes' documentation writes."""
    import torch
    from transformers import BitsAndBytesConfig

    if case.strategy != "qlora":
        return {"dtype": dtype}
    device_map = {"": torch.device(case.device)}
    # a GGUF base's own quantisation (petune's quant_type "gguf") is not bitsandbytes': the
    # plain loop re-quantises the file's tensors to NF4, as QLoRA's documentation does
    gguf_base = options["quant_type"] == "gguf"
    quant_type = "nf4" if gguf_base else options["quant_type"]
    if case.own_defaults:
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=True if gguf_base else options["double_quant"]), "device_map": device_map}
    return {"dtype": dtype, "device_map": device_map, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=options["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, options["compute_dtype"]),
        llm_int8_skip_modules=["lm_head"] if causal else ["classifier", "pooler.dense"])}


def _batches(passes, steps: int):
    """``steps`` batches from ``passes()`` (one pass over the data each call, a new shuffle),
    passing over the data again when it runs out."""
    done = 0
    while done < steps:
        before = done
        for batch in passes():
            yield batch
            done += 1
            if done == steps:
                return
        if done == before:
            raise ValueError("the data gives not one full batch")
