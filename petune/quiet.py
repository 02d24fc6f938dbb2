"""Keep the libraries' chatter that a user cannot act on out of the terminal.

What is kept out, and why:

* transformers' LOAD REPORT tables: a task head the checkpoint lacks is newly
  initialised on purpose (petune trains it and saves it with the adapter), and a base
  checkpoint's unused pre-training head is expected; petune checks what it needs itself.
* bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": an
  optional faster CPU kernel from the ``kernels`` package; 4-bit works without it.
* transformers' "The modules are dequantized in ...": merging a QLoRA run dequantises its
  base on purpose (see the qlora strategy).
* tqdm "Loading weights" bars (and the Hub's bars): petune draws its own progress.

The diverted log records are not lost: they go to the ``petune.libraries`` logger, so a
handler on ``petune`` (or the root logger), such as a run's log file, receives them.
"""

from __future__ import annotations

import logging
import os

#: logger name -> text in the messages kept out of the terminal. transformers logs its
#: LOAD REPORT on the logger of the module that loaded the weights, so each is named.
DIVERTED = {
    "transformers.modeling_utils": "LOAD REPORT",
    "transformers.integrations.peft": "LOAD REPORT",
    "transformers.modeling_layers": "LOAD REPORT",
    "transformers.utils.loading_report": "LOAD REPORT",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "transformers.integrations.bitsandbytes": "The modules are dequantized in",
}

library_log = logging.getLogger("petune.libraries")


class _Divert(logging.Filter):
    """Hands matching records to petune's logger instead of the library's handlers."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in str(record.msg):
            return True
        library_log.handle(record)
        return False


def quiet_libraries() -> None:
    """Install the diversions; call before transformers or bitsandbytes is imported (the
    bitsandbytes message is logged at import). Cheap: imports neither library."""
    # Without a handler of its own, petune's logger would reach logging's last-resort
    # handler, which prints warnings to stderr: exactly what this module keeps out.
    petune_log = logging.getLogger("petune")
    if not any(isinstance(h, logging.NullHandler) for h in petune_log.handlers):
        petune_log.addHandler(logging.NullHandler())
    for name, text in DIVERTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Divert) for f in logger.filters):
            logger.addFilter(_Divert(text))
    # Read by huggingface_hub, and by transformers when it is imported: no tqdm bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
