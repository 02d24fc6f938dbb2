"""The plugin host: discovery, isolation of broken plugins, collisions, order, blame."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from demo_plugins import DemoStrategy, demo_host, plugin_module
from helpers import write_recipe

from petune.errors import PluginError
from petune.plugins import PluginHost, PluginOrigin

REPO = Path(__file__).resolve().parents[1]
PETUNE = [sys.executable, "-m", "petune"]


def test_first_party_plugins_are_discovered_through_entry_points():
    host = PluginHost(autoload=False)
    names = {(r["kind"], r["name"]) for r in host.listing()}
    for strategy in ("full", "lora", "qlora", "adapters", "prompt_tuning"):
        assert ("strategy", strategy) in names
    for task in ("classification", "ner", "sft"):
        assert ("task", task) in names
    for source in ("random", "local", "hub", "gguf", "packaged"):
        assert ("model_source", source) in names
    assert all(r["package"] == "petune" for r in host.listing())
    assert host.failures == []


def test_collision_is_an_error_naming_both_packages():
    other = plugin_module("other", register_strategies=lambda register: register(DemoStrategy))
    host = demo_host((PluginOrigin("other-pkg", "2.0", "other"), other))
    assert any("already registered by demo-plugins" in str(f) and "other-pkg" in str(f) for f in host.failures)
    with pytest.raises(PluginError) as info:
        host.strategy("demo_strategy")
    assert "demo-plugins" in str(info.value) and "other-pkg" in str(info.value)
    host.task("demo_task")  # the rest keeps working


def test_a_plugin_whose_registration_raises_is_isolated():
    def boom(register):
        raise ValueError("bad registration")

    host = demo_host((PluginOrigin("boom-pkg", "0.1", "boom"), plugin_module("boom", register_tasks=boom)))
    assert [str(f) for f in host.failures] == [
        "plugin 'boom' from package boom-pkg 0.1: register_tasks raised ValueError: bad registration"]
    assert host.task("demo_task").name == "demo_task"


def test_strict_mode_makes_plugin_failures_fatal():
    def boom(register):
        raise ValueError("bad registration")

    with pytest.raises(PluginError, match="boom-pkg"):
        PluginHost(autoload=False, strict=True,
                   extra=[(PluginOrigin("boom-pkg", "0.1", "boom"), plugin_module("boom", register_tasks=boom))])


def test_registering_something_that_is_not_a_plugin_class_fails_cleanly():
    host = demo_host((PluginOrigin("odd", "1", "odd"), plugin_module("odd", register_tasks=lambda register: register(42))))
    assert "expects a subclass of petune.api.Task" in str(host.failures[0])


def test_lifecycle_hook_errors_name_the_plugin_and_package():
    def on_run_start(run):
        raise RuntimeError("telemetry down")

    calls = []
    ok = plugin_module("ok", on_run_start=lambda run: calls.append(run))
    host = demo_host((PluginOrigin("good-pkg", "1", "good"), ok),
                     (PluginOrigin("bad-pkg", "3.1", "bad"), plugin_module("bad", on_run_start=on_run_start)))
    with pytest.raises(PluginError) as info:
        host.call("on_run_start", run="RUN")
    assert "plugin 'bad' from package bad-pkg 3.1" in str(info.value) and "telemetry down" in str(info.value)
    assert calls == ["RUN"]  # plugins run in the documented order: good-pkg before bad-pkg


def test_trainer_callbacks_hook_collects_lists():
    mod = plugin_module("cb", trainer_callbacks=lambda run: ["CB"])
    host = demo_host((PluginOrigin("cb-pkg", "1", "cb"), mod))
    from types import SimpleNamespace

    run = SimpleNamespace(strategy=DemoStrategy(), recipe=None)  # first-party hooks see the run too
    assert host.call("trainer_callbacks", run=run) == [["CB"]]


def test_lifecycle_hooks_go_through_pluggy_tryfirst_trylast_and_wrappers():
    from petune import hookimpl

    def module(name, **hooks):
        import types

        mod = types.ModuleType(name)
        for hook_name, (fn, marks) in hooks.items():
            setattr(mod, hook_name, hookimpl(**marks)(fn))
        return mod

    def wrap(run):
        run.append("wrapper before")
        result = yield
        run.append("wrapper after")
        return result

    plain = module("plain", on_run_start=(lambda run: run.append("plain"), {}))
    last = module("last", on_run_start=(lambda run: run.append("last"), {"trylast": True}))
    first = module("first", on_run_start=(lambda run: run.append("first"), {"tryfirst": True}))
    wrapper = module("wrapper", on_run_start=(wrap, {"wrapper": True}))
    host = PluginHost(autoload=False, extra=[(PluginOrigin(n, "1", n), m) for n, m in
                                             (("last", last), ("plain", plain), ("first", first), ("wrapper", wrapper))])
    seen = []
    host.call("on_run_start", run=seen)
    assert seen == ["wrapper before", "first", "plain", "last", "wrapper after"]


def test_order_is_first_party_then_by_package_name():
    a = plugin_module("a", on_run_start=lambda run: run.append("zzz"))
    b = plugin_module("b", on_run_start=lambda run: run.append("aaa"))
    host = PluginHost(autoload=False, extra=[(PluginOrigin("zzz-pkg", "1", "z"), a), (PluginOrigin("aaa-pkg", "1", "a"), b)])
    seen = []
    host.call("on_run_start", run=seen)
    assert seen == ["zzz", "aaa"]  # in-process extras keep the order given; entry points are sorted
    from petune.plugins import _entry_points

    origins = [o for o, _ in _entry_points(autoload=True)]
    first_party = [o for o in origins if o.first_party]
    assert origins[: len(first_party)] == first_party
    assert [o.entry_point for o in first_party] == sorted(o.entry_point for o in first_party)


# -- real packages installed into a throwaway folder ----------------------------------------
def pip_install_into(target: Path, project: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(project)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    pip_install_into(target, REPO / "examples" / "petune-plugin-example")
    return target


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("broken-site")
    pip_install_into(target, REPO / "tests" / "plugins" / "broken-plugin")
    return target


def petune(*args, paths=(), env=None, **kwargs):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in paths), **(env or {}))
    return subprocess.run([*PETUNE, *args], capture_output=True, text=True, env=environ, timeout=300, check=False, **kwargs)


def test_third_party_package_is_listed(plugin_site):
    result = petune("plugins", "--json", paths=[plugin_site])
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"name": "bitfit", "kind": "strategy", "package": "petune-plugin-example", "version": "0.1.0"} in rows
    assert all(set(r) == {"name", "kind", "package", "version"} for r in rows)


def test_disable_autoload_keeps_first_party_only(plugin_site):
    result = petune("plugins", "--json", paths=[plugin_site], env={"PETUNE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    rows = json.loads(result.stdout)
    assert "bitfit" not in {r["name"] for r in rows} and "lora" in {r["name"] for r in rows}


def test_broken_plugin_is_reported_in_one_line_and_the_rest_works(broken_site):
    result = petune("plugins", paths=[broken_site])
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if "petune-broken-plugin" in line]
    assert len(lines) == 1
    assert "RuntimeError: this plugin is broken on purpose" in lines[0]
    assert "lora" in result.stdout and "Traceback" not in result.stderr


def test_broken_plugin_is_fatal_in_strict_mode(broken_site):
    result = petune("plugins", paths=[broken_site], env={"PETUNE_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert "petune-broken-plugin" in result.stderr and "Traceback" not in result.stderr


def test_a_recipe_can_use_the_third_party_strategy(plugin_site, tmp_path):
    recipe = write_recipe(tmp_path / "bitfit.toml", model="random:tiny-bert",
                          task={"name": "classification", "train": "train.csv"},
                          strategy={"name": "bitfit", "train_layer_norm": True}, output="runs/bitfit")
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"good movie {i},pos\nbad film {i},neg\n" for i in range(8)))
    result = petune("validate", str(recipe), paths=[plugin_site])
    assert result.returncode == 0, result.stderr
    bad = petune("validate", str(recipe), "--set", "strategy.train_layer_nrom=true", paths=[plugin_site])
    assert bad.returncode == 2 and "strategy.train_layer_nrom: unknown key — did you mean strategy.train_layer_norm?" in bad.stderr
