"""petune's benchmark suite: every strategy, petune's own code path against a plain
transformers + peft (+ bitsandbytes) loop, one process per configuration.

Run it with ``petune bench`` (or ``python -m benchmarks``); see benchmarks/README.md.
"""
