"""Text regression as a third-party petune task: only the methods petune requires.

Data is a CSV file with ``text`` and ``score`` columns; the model is the base with a
one-output regression head (mean squared error); the metrics are MSE and MAE.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pydantic import Field

from petune import hookimpl
from petune.api import DataPath, Options, Task, TaskData, load_pretrained
from petune.errors import DataError


class TextRegressionOptions(Options):
    train: DataPath
    validation: DataPath | None = None
    max_length: int = Field(64, ge=8)


def read_rows(path: Path) -> tuple[list[str], list[float]]:
    texts, scores = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                texts.append(row["text"])
                scores.append(float(row["score"]))
            except (KeyError, TypeError, ValueError):
                raise DataError("each row needs a text and a numeric score", where=f"{path}:{line}") from None
    if not texts:
        raise DataError("no rows", where=str(path))
    return texts, scores


class TextRegressionTask(Task):
    name = "text_regression"
    description = "a score per text (regression head, MSE) — petune's minimal third-party task example"
    Options = TextRegressionOptions
    peft_task_type = "SEQ_CLS"

    def load_data(self, options, tokenizer) -> TaskData:
        from datasets import Dataset

        def encode(path):
            texts, scores = read_rows(path)
            encoded = tokenizer(texts, truncation=True, max_length=options.max_length)
            return Dataset.from_dict({**encoded, "labels": scores})

        validation = encode(options.validation) if options.validation else None
        return TaskData(train=encode(options.train), validation=validation)

    def build_model(self, model_info, options, state, **load_kwargs):
        from transformers import AutoModelForSequenceClassification

        # load_pretrained: from_pretrained for any folder a model source gives (a GGUF file's too)
        return load_pretrained(AutoModelForSequenceClassification, model_info.path, num_labels=1,
                               problem_type="regression", **load_kwargs)

    def make_trainer(self, *, model, tokenizer, data, options, args, callbacks):
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        return Trainer(model=model, args=TrainingArguments(**args), train_dataset=data.train,
                       eval_dataset=data.validation, data_collator=DataCollatorWithPadding(tokenizer),
                       callbacks=callbacks)

    def evaluate(self, trainer, data, options, run_dir) -> dict[str, dict]:
        import numpy as np

        if data.validation is None:
            return {}
        output = trainer.predict(data.validation)
        error = output.predictions.reshape(-1) - np.asarray(output.label_ids).reshape(-1)
        return {"validation": {"mse": float((error**2).mean()), "mae": float(np.abs(error).mean())}}


@hookimpl
def register_tasks(register):
    register(TextRegressionTask)
