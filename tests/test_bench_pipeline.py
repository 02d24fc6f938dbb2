"""`petune bench` measures what `petune run` runs: both build their trainer with the runner's
own stages (trainer_setup.build_trainer), so arguments, callbacks and optimizer groups are the
same for every strategy; only the data source differs."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness, petune_side
from petune import runner
from petune.plugins import PluginHost
from petune.recipe import validate

# where a path or a run name lives, the two differ by design
_PLACES = {"output_dir", "logging_dir", "run_name"}


def trainer_facts(trainer) -> dict:
    """What a step of this trainer does: its class, arguments, callbacks and optimizer groups."""
    optimizer = trainer.optimizer or trainer.create_optimizer()
    args = {k: v for k, v in trainer.args.to_dict().items() if k not in _PLACES}
    return {
        "trainer": type(trainer).__name__,
        "args": json.loads(json.dumps(args, default=str)),
        "callbacks": [type(cb).__name__ for cb in trainer.callback_handler.callbacks],
        "optimizer": type(optimizer).__name__,
        "groups": [(g["lr"], g.get("weight_decay"), sum(p.numel() for p in g["params"])) for g in optimizer.param_groups],
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


@pytest.mark.parametrize("strategy, options", [
    ("full", {}), ("lora", {}), ("qlora", {}), ("adapters", {}), ("prompt_tuning", {}),
    ("lora", {"loraplus_lr_ratio": 16.0}),  # the strategy's own optimizer groups
    ("peft", {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0}),  # its own training callback
], ids=["full", "lora", "qlora", "adapters", "prompt_tuning", "loraplus", "adalora"])
def test_the_bench_and_petune_run_build_the_same_trainer(strategy, options, tmp_path, monkeypatch):
    case = harness.Case(shape="tiny-llama", strategy=strategy, side="petune", batch=2, seq=96, steps=1, warmup=0,
                        gradient_checkpointing=True, work_dir=str(tmp_path / "bench"),
                        strategy_options={**harness.STRATEGY_OPTIONS.get(strategy, {}), **options})
    bench = trainer_facts(petune_side.build(case)[0])

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f" {i}"}) + "\n" for i in range(8)))
    recipe = petune_side.recipe_data(case, "random:tiny-llama", data)
    recipe["output"]["dir"] = str(tmp_path / "run")
    built = {}

    def stop_before_training(trainer, start):
        built["facts"] = trainer_facts(trainer)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", stop_before_training)
    host = PluginHost()
    with pytest.raises(KeyboardInterrupt):
        runner.run(validate(recipe, host, path=tmp_path / "recipe.toml"), host)
    assert built["facts"] == bench
