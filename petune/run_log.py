"""A run's log file, ``run.log``: what the libraries log while a run works (warnings, the
LOAD REPORTs kept off the terminal by :mod:`petune.quiet`, Python warnings), so nothing
hidden from the terminal is lost. Records from before the run folder exists are held in
memory and written first."""

from __future__ import annotations

import logging
from pathlib import Path

#: loggers whose records go into the run's log (transformers' does not propagate to the root)
LOGGERS = ("petune", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "py.warnings")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Held(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """Collect library log records from now on; ``write_to(path)`` starts the file."""

    def __init__(self):
        self.handler: logging.Handler = _Held()
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self.handler)

    def write_to(self, path: Path) -> None:
        held = self.handler
        file = logging.FileHandler(path, encoding="utf-8")
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter(FORMAT))
        for record in getattr(held, "records", []):
            file.handle(record)
        self._swap(held, file)

    def _swap(self, old: logging.Handler, new: logging.Handler | None) -> None:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(old)
            if new is not None:
                logger.addHandler(new)
        old.close()
        self.handler = new

    def close(self) -> None:
        if self.handler is not None:
            self._swap(self.handler, None)
            logging.captureWarnings(False)
