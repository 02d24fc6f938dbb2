"""The hooks petune offers to plugins — the one module a plugin author reads.

A plugin is a module (or object) exposed through the ``petune`` entry-point group
in its package's ``pyproject.toml``::

    [project.entry-points.petune]
    my_strategy = "my_package.my_module"

and implementing any of the hooks below with ``@petune.hookimpl``::

    from petune import hookimpl

    @hookimpl
    def register_strategies(register):
        register(MyStrategy)

First-party strategies, tasks and model sources are registered the same way, from
``petune_plugins`` (the folder of that name in the repository).

Order: first-party plugins load first, then third-party packages sorted by
distribution name and then entry-point name.

* Registration hooks (``register_strategies``, ``register_tasks``,
  ``register_model_sources``, ``register_rewards``) are called once per plugin in that order, when the host
  starts; registering a name that is already taken is an error naming both packages.
* Lifecycle hooks are called through pluggy, in that order, for each run:
  ``on_run_start`` (plan fixed, before training) → ``trainer_callbacks`` (while the
  trainer is built) → ``on_run_end`` (always, also after a failure). pluggy's markers
  work as documented: ``@hookimpl(tryfirst=True)`` / ``trylast=True`` move a plugin to
  the front or back, and ``@hookimpl(wrapper=True)`` generators wrap the others.
  An exception in a third-party hook is reported naming its package.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("petune")


@hookspec
def register_strategies(register):
    """Register strategy classes: ``register(MyStrategy)``.

    A strategy subclasses :class:`petune.api.Strategy` and decides which parameters
    train (full, LoRA, adapters, ...).
    """


@hookspec
def register_tasks(register):
    """Register task classes: ``register(MyTask)``.

    A task subclasses :class:`petune.api.Task` and owns data loading, the model head,
    collator, metrics and the trainer it runs on.
    """


@hookspec
def register_model_sources(register):
    """Register model-source classes: ``register(MySource)``.

    A model source subclasses :class:`petune.api.ModelSource` and turns a recipe's
    ``[model] name`` into a local folder in transformers format.
    """


@hookspec
def register_rewards(register):
    """Register reward classes: ``register(MyReward)``.

    A reward subclasses :class:`petune.api.Reward` and scores completions for tasks that
    learn from rewards (``grpo``); a recipe names it in ``[[task.rewards]]``.
    """


@hookspec
def register_commands(subparsers):
    """Add ``petune`` sub-commands: ``p = subparsers.add_parser("name", help=...)``, its
    arguments, and ``p.set_defaults(func=run)`` where ``run(args) -> int`` is the exit code.
    petune's own commands beyond ``run``/``validate``/``plugins``/``recipes``/``env``
    register this way too. Raise :class:`petune.errors.UserError` for the user's mistakes:
    the CLI prints it without a traceback and exits 2. Called once, when the CLI starts.
    """


@hookspec
def on_run_start(run):
    """Called once a run's plan is fixed, before training. ``run`` is a
    :class:`petune.runner.Run` (recipe, run folder, task, strategy)."""


@hookspec
def trainer_callbacks(run):
    """Return a list of ``transformers.TrainerCallback`` objects to add to the trainer."""


@hookspec
def on_run_end(run, result):
    """Called after a run ends. ``result`` is a :class:`petune.runner.RunResult`
    (status ``"completed"``, ``"failed"`` or ``"interrupted"``, metrics, error)."""
