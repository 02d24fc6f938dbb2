"""BitFit for petune: only bias terms (and the task head) train.

Saved as `adapter/bitfit.safetensors` (the trained tensors only) + `bitfit_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from petune import hookimpl
from petune.api import Options, Strategy


class BitFitOptions(Options):
    train_layer_norm: bool = False


def _trains(name: str, options: BitFitOptions, heads: list[str]) -> bool:
    if any(name == h or name.startswith(h + ".") for h in heads):
        return True
    if name.endswith(".bias"):
        return True
    return options.train_layer_norm and ("norm" in name.lower()) and name.endswith(".weight")


class BitFitStrategy(Strategy):
    name = "bitfit"
    description = "train only bias terms and the task head (BitFit)"
    Options = BitFitOptions
    artifact = "adapter"

    def apply(self, model, task, options):
        heads = task.head_modules(model)
        for name, param in model.named_parameters():
            param.requires_grad = _trains(name, options, heads)
        model._bitfit = {"options": options.model_dump(), "heads": heads}
        return model

    def save(self, model, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(path / "bitfit.safetensors"))
        (path / "bitfit_config.json").write_text(json.dumps(getattr(model, "_bitfit", {}), indent=2))

    def restore(self, base, path: Path, task, options):
        from safetensors.torch import load_file

        tensors = load_file(str(path / "bitfit.safetensors"))
        missing = set(tensors) - {n for n, _ in base.named_parameters()}
        if missing:
            raise ValueError(f"saved tensors not in the base model: {sorted(missing)[:3]}")
        base.load_state_dict(tensors, strict=False)
        return base


@hookimpl
def register_strategies(register):
    register(BitFitStrategy)
