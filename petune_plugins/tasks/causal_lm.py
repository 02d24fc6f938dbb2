"""The causal-LM base of the tasks that train a decoder on text (``sft``, ``preference``; a new
causal-LM task such as GRPO subclasses :class:`CausalLmTask` too): which models they accept,
how the model is built from a run's tokenizer set-up, how it answers a conversation, the
checkpointing arguments TRL's trainers need, and the held-out loss per answer token.
"""

from __future__ import annotations

import math

from petune.api import ModelInfo, ModelShape, Task, contiguous_head_input, load_pretrained, seeded
from petune.errors import Refusal, UserError
from petune_plugins.tasks._common import check_data_paths, evaluating, model_device
from petune_plugins.tasks.chat_records import chat_message
from petune_plugins.tasks.chat_templates import render, stop_token_ids, template_for

__all__ = [
    "CAUSAL_LM_SHAPE", "CausalLmTask", "build_causal_lm", "checkpointing_args", "held_out_loss",
    "is_prompt_learning", "seeded",
]

#: a causal LM trained on next-token labels over the whole vocabulary (memory estimate)
CAUSAL_LM_SHAPE = ModelShape("AutoModelForCausalLM", labels="tokens", causal_lm_loss=True)


class CausalLmTask(Task):
    """What the tasks that train a causal LM on text share: the model they accept, the
    estimate's model shape and sequence length, what explain reads, the model they build
    (:func:`build_causal_lm`) and how it answers (``generate``: petune generate, chat, serve and
    the sample generations). A subclass sets up its tokenizer with
    :func:`~petune_plugins.tasks.chat_templates.prepare_chat_tokenizer`, whose state
    ``build_model`` and ``generate`` read; its options have ``max_length``."""

    peft_task_type = "CAUSAL_LM"
    explained_output = "next_token"  # petune explain: attributions for the next token

    def model_shape(self, config) -> ModelShape:
        return CAUSAL_LM_SHAPE

    def sequence_length(self, options) -> int:
        return options.max_length

    def check(self, model_info: ModelInfo, options) -> None:
        if not model_info.is_decoder_only:
            raise Refusal(f"the {self.name} task trains a causal (decoder-only) language model, and {model_info.name} "
                          f"is a {model_info.model_type} model that does not generate text", where="task.name",
                          hint="use a causal LM (e.g. gemma-3-270m), or a task for encoders: classification, ner")
        limit = model_info.max_positions
        if limit and options.max_length > limit:
            raise Refusal(f"task.max_length = {options.max_length} is longer than the model's context "
                          f"({limit} positions)", where="task.max_length",
                          hint=f"set task.max_length to {limit} or less")
        check_data_paths(options)  # before any model loads, as in every task

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options, state: dict, **load_kwargs):
        return build_causal_lm(model_info, state, **load_kwargs)

    # -- generation (petune generate / chat / serve, sample generations) --------------------
    def generate(self, model, tokenizer, options, state: dict, messages: list[dict], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | str | None = None,
                 seed: int | None = None) -> str:
        """The model's answer to ``messages`` (role/content dicts), rendered with the run's chat
        template and its generation prompt. Greedy when ``temperature == 0``; stops at the
        end-of-turn/EOS token or at any ``stop`` string (not included); returns only new text."""
        import copy

        import torch

        contiguous_head_input(model)  # also while training (sample generations): see there
        messages = [chat_message(m, i) for i, m in enumerate(messages)]
        prompt = render(tokenizer, template_for(tokenizer, state), messages, add_generation_prompt=True)
        device = model_device(model)
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
        prompt_length = inputs["input_ids"].shape[1]
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if context:
            if prompt_length >= context:
                raise UserError(f"the prompt takes {prompt_length} tokens, and the model's context is {context}",
                                hint="shorten the prompt or the conversation (chat: /reset)")
            max_new_tokens = min(max_new_tokens, context - prompt_length)
        stop_ids = stop_token_ids(tokenizer, state, model)
        config = copy.deepcopy(model.generation_config)
        sampling = temperature > 0
        config.update(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=stop_ids,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
                      temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                      top_k=None, min_new_tokens=None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        extra = {"stop_strings": stop, "tokenizer": tokenizer} if stop else {}
        with evaluating(model), torch.no_grad(), seeded(seed if sampling else None, device):
            output = model.generate(**inputs, generation_config=config, **extra)
        new = output[0, prompt_length:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        return text


def build_causal_lm(model_info: ModelInfo, state: dict, **load_kwargs):
    """The causal LM for a run whose tokenizer was prepared here: embeddings resized for an
    added pad token, pad id set, generation stopping on the trained end-of-turn token (the
    state :func:`~petune_plugins.tasks.chat_templates.prepare_chat_tokenizer` returned). Shared
    with the seq2seq task's decoder-only models."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, model_info.path, **load_kwargs)
    vocab_size = state.get("vocab_size")
    if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)  # a pad token was added (the tokenizer had none to reuse)
    if state.get("pad_token_id") is not None:
        model.config.get_text_config().pad_token_id = state["pad_token_id"]
        model.generation_config.pad_token_id = state["pad_token_id"]
    # generation stops on the trained end-of-turn token, here and in a merged export
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos += [i for i in state.get("stop_token_ids", []) if i not in eos]
    if eos:
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    return model


def checkpointing_args(args: dict, config_class) -> dict:
    """``args`` with activation (gradient) checkpointing off unless asked for: SFTConfig turns it
    on by default. transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*
    (the old names still work, with a warning); pass whichever name this version has."""
    args = dict(args)
    fields = getattr(config_class, "__dataclass_fields__", {})
    for old, new, default in (("gradient_checkpointing", "activation_checkpointing", False),
                              ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", None)):
        value = args.pop(new, None)
        old_value = args.pop(old, None)
        value = old_value if value is None else value
        args[new if new in fields else old] = default if value is None else value
    return args


def held_out_loss(trainer, dataset) -> dict:
    """Mean loss per answer token over a dataset (summed over tokens, not averaged per batch)
    and its perplexity, exp(loss)."""
    import torch

    model = trainer.model
    nll, tokens = 0.0, 0
    with evaluating(model), torch.no_grad():
        for batch in trainer.get_eval_dataloader(dataset):
            batch = trainer._prepare_inputs(batch)
            with trainer.compute_loss_context_manager():
                # TRL's fused LM head: per-token log-probabilities without the full logits
                out = model(**batch, use_cache=False, fused_lm_head=True)
            nll -= out.log_probs.double().sum().item()
            tokens += int(out.label_mask.sum().item())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
            "examples": len(dataset)}


def is_prompt_learning(model) -> bool:
    """Whether the model carries prompt or prefix tuning (virtual tokens)."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())
