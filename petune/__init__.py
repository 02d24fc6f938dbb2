"""petune: parameter-efficient fine-tuning driven by TOML recipes and pluggy plugins."""

import pluggy

__version__ = "0.1.0"

#: Mark hook implementations in a plugin: ``@petune.hookimpl def register_tasks(register): ...``
hookimpl = pluggy.HookimplMarker("petune")

__all__ = ["__version__", "hookimpl"]
