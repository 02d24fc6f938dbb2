"""Strategy 'peft' (every peft method, options from peft's config dataclass) and the LoRA
initialisations, on the tiny random models (CPU, a few seconds each).

For several methods × a classification and a causal-LM model: trainable counts equal plain peft's
and only adapter + head train, one optimiser run changes exactly those tensors, save →
``PeftModel.from_pretrained`` on a fresh base gives the same logits. Option validation goes
through the recipe validator, as a user meets it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import recipe_data
from test_strategies import build, check_training, logits, n_trainable, trainable_names  # noqa: F401 (fixture)

from petune.errors import RecipeError, Refusal, UserError


def peft_strategy(method, **options):
    from petune.plugins import PluginHost

    s = PluginHost(autoload=False).strategy("peft")
    return s, s.Options.model_validate({"method": method, **options})


def validate(strategy: dict, host):
    from petune.recipe import validate as validate_recipe

    data = recipe_data(model="random:tiny-bert", task={"name": "classification", "train": "x.csv"}, strategy=strategy,
                       output="runs/x")
    return validate_recipe(data, host, check_paths=False)


# method → options that fit the 64-wide tiny models
METHODS = {
    "ia3": {},
    "vera": {"r": 8},
    "loha": {"r": 4},
    "lokr": {"r": 4},
    "oft": {"r": 0, "oft_block_size": 8},
    "boft": {"boft_block_size": 4},
    "adalora": {"total_step": 10, "init_r": 4, "target_r": 2},
    "fourierft": {"n_frequency": 50},
    "hra": {"r": 4},
}


# each method on one of the two models (IA3 on both): the pairs alternate to keep the run short
PAIRS = [("ia3", "llama-lm")] + [(m, ("bert-seq", "llama-lm")[i % 2]) for i, m in enumerate(METHODS)]


@pytest.mark.parametrize("method,kind", PAIRS)
def test_method_trains_only_adapter_and_head_and_reloads(build, tmp_path, method, kind):
    from peft import PeftModel, get_peft_model

    model, task, batch = build(kind)
    s, opts = peft_strategy(method, **METHODS[method])
    s.check(task, None, opts)
    peft_model = s.apply(model, task, opts)

    # the same count as plain peft with the same config
    plain_base, _, _ = build(kind)
    plain = get_peft_model(plain_base, s.peft_config(opts, task, task.heads))
    trainable, _ = plain.get_nb_trainable_parameters()
    assert n_trainable(peft_model) == trainable > 0

    names = trainable_names(peft_model)
    adapter = {n for n in names if not any(f"{h}." in n for h in task.heads)}
    assert adapter, "no adapter tensors train"
    assert all(".default" in n for n in adapter), f"non-adapter tensors train: {adapter}"
    assert all(any(f"{h}.modules_to_save" in n for n in names) for h in task.heads), "the head does not train"

    check_training(peft_model, batch)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")
    fresh, _, _ = build(kind, seed=1)  # a different random head: it must come from the adapter
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_mergeable_method_merges(build):
    model, task, batch = build("llama-lm")
    s, opts = peft_strategy("loha", r=4)
    peft_model = s.apply(model, task, opts)
    check_training(peft_model, batch)
    expected = logits(peft_model, batch)
    merged = s.merge(peft_model)
    assert not any("hada_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-4, atol=1e-4)


# -- options from the peft dataclass -----------------------------------------------------------------
def test_options_come_from_the_peft_config_class():
    from peft import VeraConfig

    _, opts = peft_strategy("vera")
    assert opts.r == VeraConfig().r and opts.projection_prng_key == VeraConfig().projection_prng_key
    _, opts = peft_strategy("vera", r=16, target_modules=["query", "value"])
    assert opts.r == 16 and opts.target_modules == ["query", "value"]


def test_unknown_option_names_the_key_with_did_you_mean(host):
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "vera", "rr": 8}, host)
    assert "strategy.rr: unknown key — did you mean strategy.r?" in str(exc.value)
    # an option of another method is unknown for this one
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "ia3", "boft_block_size": 4}, host)
    assert "strategy.boft_block_size: unknown key" in str(exc.value)


def test_wrong_type_names_the_key(host):
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "vera", "r": "8", "target_modules": 3}, host)
    text = str(exc.value)
    assert "strategy.r: expected an integer, got '8'" in text
    assert "strategy.target_modules: expected string or list of (string) or none, got 3" in text


def test_unknown_and_refused_methods(host):
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "ia4"}, host)
    assert "strategy.method: unknown peft method 'ia4' — did you mean 'ia3'?" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "prefix_tuning"}, host)
    assert "virtual tokens" in str(exc.value) and "prompt_tuning" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "lora"}, host)
    assert "use strategy 'lora'" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft"}, host)
    assert "strategy.method" in str(exc.value)


def test_settings_petune_owns_are_refused(host):
    with pytest.raises(RecipeError) as exc:
        validate({"name": "peft", "method": "ia3", "modules_to_save": ["classifier"]}, host)
    assert "strategy.modules_to_save: set by petune" in str(exc.value)


def test_resolved_options_validate_again(host):
    recipe = validate({"name": "peft", "method": "boft", "boft_block_size": 4}, host)
    again = validate(recipe.resolved()["strategy"], host)
    assert again.strategy == recipe.strategy


def test_peft_rules_run_before_anything_loads():
    from test_strategies import StubTask

    s, opts = peft_strategy("adalora", total_step=10, tinit=8, tfinal=4)  # peft's own __post_init__ refuses
    with pytest.raises(UserError, match="budgeting phase"):
        s.check(StubTask("SEQ_CLS", ["classifier"]), None, opts)
    s, opts = peft_strategy("ia3", target_modules=["query"], feedforward_modules=["output.dense"])
    with pytest.raises(UserError, match="feedforward_modules"):
        s.check(StubTask("CAUSAL_LM"), None, opts)


def test_refusals_for_impossible_mixes(tiny_llama_path):
    from test_strategies import StubTask

    from petune.api import ModelInfo

    info = ModelInfo.from_path("q", tiny_llama_path)
    info.config.quantization_config = {"quant_method": "gptq"}
    s, opts = peft_strategy("hra")
    with pytest.raises(Refusal, match=r"quantised \(gptq\).*no gptq layers for method 'hra'"):
        s.check(StubTask("CAUSAL_LM"), info, opts)


def test_methods_that_do_not_fit_the_model_say_so(build):
    model, task, _ = build("llama-lm")
    s, opts = peft_strategy("vblora")  # vector_length 256 does not divide the 64-wide layers
    with pytest.raises(UserError, match="vector_length") as exc:
        s.apply(model, task, opts)
    assert exc.value.where == "strategy"


def test_listing_covers_the_installed_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from petune_plugins.strategies.peft_methods import method_listing

    rows = {r["method"]: r for r in method_listing()}
    assert len(rows) == len(PEFT_TYPE_TO_CONFIG_MAPPING)
    assert rows["ia3"]["offered"] and {"target_modules", "feedforward_modules"} <= {o["name"] for o in rows["ia3"]["options"]}
    assert not rows["prompt_tuning"]["offered"] and "prompt_tuning" in rows["prompt_tuning"]["refused"]


# -- LoRA initialisations --------------------------------------------------------------------------
def lora(name="lora", **options):
    from petune.plugins import PluginHost

    s = PluginHost(autoload=False).strategy(name)
    return s, s.Options(**options)


@pytest.mark.parametrize("init,kind", [("pissa", "bert-seq"), ("olora", "llama-lm"), ("gaussian", "llama-lm")])
def test_lora_init_trains_and_saves_a_plain_adapter(build, tmp_path, init, kind):
    import json

    from peft import PeftModel

    model, task, batch = build(kind)
    s, opts = lora(r=4, init=init)
    s.check(task, None, opts)
    peft_model = s.apply(model, task, opts)
    check_training(peft_model, batch)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # PiSSA / OLoRA rewrite the base while training: saved as a rank-2r LoRA for the original base
    assert config["r"] == (8 if init in ("pissa", "olora") else 4)
    assert config["init_lora_weights"] == ("gaussian" if init == "gaussian" else True)
    reloaded = PeftModel.from_pretrained(build(kind, seed=1)[0], str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-4, atol=1e-4)


def test_lora_init_refusals():
    from test_strategies import StubTask

    task = StubTask("CAUSAL_LM")
    for name, init, match in [("lora", "loftq", "not quantised"), ("qlora", "pissa", "4-bit base cannot"),
                              ("qlora", "corda", "4-bit base cannot")]:
        s, opts = lora(name, init=init)
        with pytest.raises(Refusal, match=match) as exc:
            s.check(task, None, opts)
        assert exc.value.where == "strategy.init"
    s, opts = lora(init="pissa", use_rslora=True)
    with pytest.raises(Refusal, match="rank-stabilised"):
        s.check(task, None, opts)


@pytest.mark.parametrize("init,kind", [("eva", "bert-seq"), ("eva", "llama-lm"), ("corda", "bert-seq"),
                                       ("corda", "llama-lm")])
def test_data_driven_init_reads_training_batches(build, tmp_path, init, kind):
    """EVA and CorDA initialise in Strategy.prepare from the task's batches: the adapter differs
    from the default init, counts equal plain peft's, and the saved adapter reloads as is."""
    import itertools
    import json

    from peft import PeftModel, get_peft_model

    from petune_plugins.strategies._common import lora_config

    model, task, batch = build(kind)
    s, opts = lora(r=4, init=init, init_batches=2)
    s.check(task, None, opts)
    assert f"init {init}" in s.training_plan(opts)  # its cost is in the plan
    peft_model = s.apply(model, task, opts)
    plain_base = build(kind)[0]
    plain = get_peft_model(plain_base, lora_config(opts.model_copy(update={"init": "default"}), task, plain_base))
    default = {n: p.detach().clone() for n, p in plain.named_parameters() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    seen = []

    def batches():  # lazy, as the runner's: counts what the strategy reads
        for i in itertools.count():
            seen.append(i)
            yield {k: v.roll(i, 0) for k, v in batch.items()}

    s.prepare(peft_model, task, opts, batches(), total_steps=10)
    assert len(seen) == 2, "the strategy reads init_batches batches, no more"
    assert n_trainable(peft_model) == plain.get_nb_trainable_parameters()[0] > 0
    changed = [n for n, p in peft_model.named_parameters() if "lora_A" in n and not torch.equal(p, default[n])]
    assert changed, f"{init} left A as the default init drew it"
    base_changed = [n for n, p in peft_model.named_parameters() if n in base_before and not torch.equal(p, base_before[n])]
    assert bool(base_changed) == (init == "corda"), "only CorDA keeps the residual in the base"

    check_training(peft_model, batch)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == (8 if init == "corda" else 4)  # CorDA: converted to a plain LoRA for the untouched base
    reloaded = PeftModel.from_pretrained(build(kind, seed=1)[0], str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-4, atol=1e-4)


def test_data_driven_init_refusals():
    from test_strategies import StubTask

    task = StubTask("CAUSAL_LM")
    s, opts = lora(init="eva", use_dora=True)
    with pytest.raises(Refusal, match="DoRA") as exc:
        s.check(task, None, opts)
    assert exc.value.where == "strategy.use_dora"
    s, opts = lora("qlora", init="eva")
    s.check(task, None, opts)  # EVA reads activations only: a 4-bit base is fine


def test_adalora_allocates_ranks_through_a_trainer_callback(build):
    from types import SimpleNamespace

    model, task, batch = build("bert-seq")
    s, opts = peft_strategy("adalora", total_step=10, init_r=4, target_r=2)
    peft_model = s.apply(model, task, opts)
    (callback,) = s.trainer_callbacks(opts)  # the strategy's own contract, not a global hook
    assert s.trainer_callbacks(peft_strategy("ia3")[1]) == []
    peft_model.train()
    peft_model(**batch).loss.backward()
    allocator = peft_model.base_model.rankallocator
    assert not allocator.ipt
    callback.on_optimizer_step(None, SimpleNamespace(global_step=1), None, model=peft_model)
    assert allocator.ipt, "update_and_allocate did not score the ranks"


def test_adalora_total_step_comes_from_the_run_schedule(build):
    from types import SimpleNamespace

    model, task, _ = build("bert-seq")
    s, opts = peft_strategy("adalora", init_r=4, target_r=2, tinit=2, tfinal=2)  # no total_step
    assert "strategy.total_step" in s.training_plan(opts)
    s.check(task, None, opts)
    s.check_recipe(SimpleNamespace(strategy=opts, train=SimpleNamespace(max_steps=10)))
    with pytest.raises(UserError, match="train.max_steps = 4") as exc:  # no budgeting phase left: peft's rule
        s.check_recipe(SimpleNamespace(strategy=opts, train=SimpleNamespace(max_steps=4)))
    assert exc.value.where == "strategy"
    peft_model = s.apply(model, task, opts)
    with pytest.raises(UserError, match="strategy.total_step") as exc:
        s.prepare(peft_model, task, opts, iter(()), total_steps=None)
    assert exc.value.where == "strategy.total_step"
    s.prepare(peft_model, task, opts, iter(()), total_steps=10)
    assert peft_model.peft_config["default"].total_step == 10
    assert peft_model.base_model.rankallocator.peft_config.total_step == 10
    s2, explicit = peft_strategy("adalora", init_r=4, target_r=2, total_step=7)
    assert s2.training_plan(explicit) == {}
    other = s2.apply(build("bert-seq")[0], task, explicit)
    s2.prepare(other, task, explicit, iter(()), total_steps=10)
    assert other.peft_config["default"].total_step == 7  # the user's value stands
