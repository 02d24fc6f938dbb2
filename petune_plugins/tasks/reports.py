"""Metric tables, confusion matrices and atomic report files shared by the task plugins.

Metrics are computed with numpy alone (no scikit-learn). Files go through
``petune.artifacts`` (temp name, then rename), so a crash never leaves a half-written
report that looks whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# -- atomic files: petune's run-folder writers, re-exported for the task plugins ----------
from petune.artifacts import save_figure, write_json, write_text  # noqa: F401


# -- classification metrics -----------------------------------------------------------------
def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """``matrix[true, predicted]`` counts."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro and weighted averages, per-class precision/recall/F1/support and
    the confusion matrix.

    Macro averages run over the classes that occur in the gold labels or the
    predictions of this split (scikit-learn's default): a class that is neither
    present nor predicted has no defined F1 and is left out."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _ratio(true_positive, predicted)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    seen = (support + predicted) > 0
    total = int(support.sum())

    def average(values: np.ndarray, weights: np.ndarray | None = None) -> float:
        if not seen.any():
            return 0.0
        if weights is None:
            return float(values[seen].mean())
        return float((values * weights).sum() / weights.sum()) if weights.sum() else 0.0

    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_precision": average(precision),
        "macro_recall": average(recall),
        "macro_f1": average(f1),
        "weighted_f1": average(f1, support),
        "support": total,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": matrix.tolist(),
    }


# -- tables ---------------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence], *, first_left: bool = True) -> str:
    """A plain-text table: floats with 4 decimals, the first column left-aligned."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text_rows)) if text_rows else len(str(h))
              for i, h in enumerate(header)]

    def line(values) -> str:
        parts = [(v.ljust(w) if (i == 0 and first_left) else v.rjust(w)) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line([str(h) for h in header]), *(line(r) for r in text_rows)]) + "\n"


def format_classification_report(report: dict) -> str:
    rows = [[label, m["precision"], m["recall"], m["f1"], m["support"]] for label, m in report["per_class"].items()]
    rows.append(["", None, None, None, None])
    rows.append(["accuracy", None, None, report["accuracy"], report["support"]])
    rows.append(["macro avg", report["macro_precision"], report["macro_recall"], report["macro_f1"], report["support"]])
    rows.append(["weighted avg", None, None, report["weighted_f1"], report["support"]])
    return format_table(["", "precision", "recall", "f1", "support"], rows)


def format_confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Rows are true labels, columns predicted labels."""
    return format_table(["true \\ predicted", *labels], [[label, *row] for label, row in zip(labels, matrix)])


# -- plots ----------------------------------------------------------------------------------
def plot_confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Save a confusion-matrix PNG: colour is the share of each true class (row), the
    number is the count. Uses matplotlib's Agg canvas directly (no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    shares = _ratio(counts, counts.sum(axis=1, keepdims=True).repeat(counts.shape[1], axis=1))
    n = len(labels)
    size = min(4 + 0.45 * n, 30)
    figure = Figure(figsize=(size + 1, size), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    axes.set_xticks(range(n), labels=[str(label) for label in labels], rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    axes.set_yticks(range(n), labels=[str(label) for label in labels])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if n <= 30:  # numbers stop being readable beyond that
        for i in range(n):
            for j in range(n):
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=9 if n > 10 else 11,
                          color="white" if shares[i, j] > 0.5 else "black")
    figure.tight_layout()
    save_figure(figure, Path(path))
    return Path(path)
