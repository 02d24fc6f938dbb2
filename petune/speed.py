"""The training loop's speed and memory options of ``[train]``: fused kernels, ``torch.compile``
and activation offloading. Each is checked before anything heavy loads, shown in the plan, and
turned into ``TrainingArguments`` keyword arguments (or, for offloading, a wrapper around the
trainer's step). Task-specific choices (e.g. the SFT task's padding-free batches) belong to the
task and reach the plan through ``Task.training_plan``.
"""

from __future__ import annotations

import importlib.util

from petune.errors import UserError

#: what the fused kernels replace (Liger, through transformers' ``use_liger_kernel``). Liger's
#: fused linear cross-entropy stays off: it replaces the model's forward, which TRL patches with
#: its own fused LM head (task.loss = "chunked", the SFT default on a GPU) that never holds the
#: full-vocabulary logits either; its plain cross-entropy is no faster than torch's.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}
LIGER_NAMES = "RMSNorm, RoPE, SwiGLU"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_model_types() -> set[str] | None:
    """The model types Liger has kernels for, or None when that cannot be read."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - an old or broken liger-kernel: transformers decides
        return None
    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check(train, cuda: bool, model_type: str | None = None) -> None:
    """Refuse what cannot run, before anything heavy loads: ``kernels = "liger"`` without a CUDA
    GPU or without the liger-kernel package, and (once the model's config is read, before its
    data and weights load) on a model type Liger has no kernels for."""
    if train.kernels != "liger":
        return
    if not cuda:
        raise UserError("train.kernels = 'liger' needs a CUDA GPU: Liger's kernels are Triton GPU kernels",
                        where="train.kernels", hint="use kernels = 'auto' (off on a CPU) or 'off'")
    if not liger_installed():
        raise UserError("train.kernels = 'liger' needs the liger-kernel package, which is not installed",
                        where="train.kernels", hint="pip install liger-kernel, or use kernels = 'auto'")
    kernels(train, cuda, model_type)  # refuses a model type without kernels


def kernels(train, cuda: bool, model_type: str | None = None) -> tuple[bool, str]:
    """(use Liger, the plan's words). ``liger`` on a model type Liger has no kernels for is
    refused; ``auto`` is then off, and the plan says why."""
    if train.kernels == "off":
        return False, "off"
    if not cuda:
        return False, "off (auto: no CUDA GPU)"
    if not liger_installed():
        return False, "off (auto: liger-kernel is not installed)"
    known = liger_model_types()
    if model_type is not None and known is not None and model_type not in known:
        if train.kernels == "liger":
            raise UserError(f"train.kernels = 'liger': Liger has no kernels for model type {model_type!r}",
                            where="train.kernels", hint="use kernels = 'auto' or 'off'")
        return False, f"off (auto: Liger has no kernels for {model_type})"
    return True, f"liger ({LIGER_NAMES})"


def training_arguments(train, cuda: bool, model_type: str | None = None) -> dict:
    """``TrainingArguments`` keyword arguments for the kernels and ``torch.compile``."""
    use_liger, _ = kernels(train, cuda, model_type)
    args: dict = {"torch_compile": train.compile}
    if use_liger:
        args.update(use_liger_kernel=True, liger_kernel_config=dict(LIGER_KERNELS))
    return args


def plan(train, cuda: bool, model_type: str | None = None) -> str:
    """The plan's row: what each option does on this machine."""
    _, kernel_words = kernels(train, cuda, model_type)
    offload = "off"
    if train.activation_offloading:
        offload = ("on (saved activations in CPU memory" + (", layer inputs only" if train.gradient_checkpointing
                                                             else "") + ")") if cuda else \
            "on, no effect on a CPU (activations are in CPU memory already)"
    return (f"kernels {kernel_words}; compile {'on (torch.compile, inductor)' if train.compile else 'off'}; "
            f"activation offloading {offload}")


def offload_activations(trainer, train, cuda: bool) -> None:
    """With ``activation_offloading`` on a GPU: every training step (forward and backward) runs
    inside TRL's activation-offloading context, which moves each tensor autograd saves for the
    backward pass to pinned CPU memory on a side stream and brings it back when the backward
    pass needs it (the LM head's output stays: it is needed right away). Under non-reentrant
    gradient checkpointing what autograd saves is the checkpointed layers' inputs. On a CPU the
    activations are in CPU memory already: nothing to do (the plan says so)."""
    if train.activation_offloading and cuda:
        wrap_training_step(trainer, offloading_context(trainer.model))


def offloading_context(model, **settings):
    """TRL's activation-offloading context for ``model`` (``settings``: its keyword arguments,
    e.g. ``use_streams``)."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    return get_act_offloading_ctx_manager(model=model, warn_if_no_head=False, **settings)


def wrap_training_step(trainer, context) -> None:
    """Run each of the trainer's training steps inside ``context`` (re-entered every step)."""
    step = trainer.training_step

    def training_step(*args, **kwargs):
        with context:
            return step(*args, **kwargs)

    trainer.training_step = training_step
