"""petune's first-party plugins (importable as ``petune_plugins``).

They are registered through the ``petune`` entry-point group in pyproject.toml,
exactly like a third-party package's plugins.
"""
