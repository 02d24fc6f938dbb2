"""Why a finished run predicts what it does: attention maps and token attributions.

What is explained is what the task says its model outputs (``Explains.explained_output`` in
:mod:`petune.api`), so this module knows no concrete task or strategy:

* ``"label"`` (sequence classifiers): attributions for the predicted label;
* ``"token_labels"`` (token classifiers): attributions for each predicted entity (the sum of the
  log-probabilities of its words' predicted tags, read on each word's first sub-token); the task
  says where its words are (``Explains.word_spans``);
* ``"next_token"`` (language models): attributions for the predicted next token.

A task that does not implement ``Explains`` is refused with a reason.

Attention maps come from the model itself (``output_attentions``), switched to eager attention
for the explanation (SDPA and flash attention return no weights). They are
``layers × heads × queries × keys`` and every row sums to 1. Attention rollout (Abnar &
Zuidema, 2020) multiplies the head-averaged maps of all layers, each mixed half-and-half with
the identity for the residual connection.

Attributions are integrated gradients (Captum) on the input embeddings by default, or gradient ×
input (``method = "gradxinput"``), summed over the embedding dimension: one signed number per
token, positive where the token supports the explained output. The baseline replaces every
token by the pad token (zeros if there is none), except special tokens ([CLS], [SEP], BOS),
which keep their embedding and so get no attribution.

Strategies: the run is loaded as it was trained (peft wrappers, bottleneck adapters, 4-bit
bases). Prompt tuning's virtual tokens are inputs the model attends to, so they appear in the
attention maps (labelled ⟨v1⟩, ⟨v2⟩ ...); they are parameters rather than text, so they get no
attribution. Prefix tuning's key/value prefixes appear as extra key columns (⟨p1⟩ ...); rollout,
which needs square maps, drops those columns and renormalises the rows.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from petune.api import model_device
from petune.errors import UserError

if TYPE_CHECKING:
    import torch
    from rich.text import Text

#: what a task's model outputs -> what is explained
KINDS = {"label": "the predicted label", "token_labels": "each predicted entity", "next_token": "the next token"}
METHODS = ("ig", "gradxinput")
#: longest input explained (attention maps grow with its square)
MAX_TOKENS = 512
#: attention figure: three panels, fixed size so the PNG is always the same number of pixels
ATTENTION_FIGSIZE = (16.5, 6.0)
DPI = 100
_LABELLED_TOKENS = 64  # more tokens than this: no tick labels on the heatmaps


# -- input ------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One tokenized input: model tensors (batch of 1) and, per token, what to show."""

    inputs: dict  # input_ids, attention_mask (+ token_type_ids when the model takes them)
    labels: list[str]  # display text of each token
    special: list[bool]  # special tokens ([CLS], BOS ...): kept in the baseline, never attributed
    spans: list[tuple[int, int, int] | None]  # (segment, start, end) of each token in `segments`
    segments: list[str]  # the text(s) shown: [text] or [text, pair] or [rendered chat prompt]
    word_ids: list[int | None] | None = None  # token -> word (token classification)
    words: list[str] | None = None

    @property
    def length(self) -> int:
        return len(self.labels)


def _token_labels(tokenizer, ids: list[int], spans, segments) -> list[str]:
    raw = tokenizer.convert_ids_to_tokens(ids)
    labels = []
    for token, span in zip(raw, spans):
        text = segments[span[0]][span[1]:span[2]] if span else None
        label = text.strip() if text and text.strip() else str(token)
        labels.append(label.replace("\n", "⏎").replace("Ġ", " ").replace("▁", " ").strip() or str(token))
    return labels


def _spans(encoding, segment_of) -> list[tuple[int, int, int] | None]:
    offsets = encoding.get("offset_mapping")
    if offsets is None:
        return [None] * len(encoding["input_ids"])
    return [(segment_of(i), int(s), int(e)) if e > s else None for i, (s, e) in enumerate(offsets)]


def _accepted_inputs(model) -> set[str] | None:
    """Keyword arguments the transformers model under any wrapper names in its forward."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = inspect.signature(base.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named or None




def _finish(model, tokenizer, encoding, spans, segments, **extra) -> Encoded:
    import torch

    ids = list(encoding["input_ids"])
    if len(ids) > MAX_TOKENS:
        raise UserError(f"the input is {len(ids)} tokens; explain takes at most {MAX_TOKENS}", where="--text",
                        hint="shorten the text")
    if not ids:
        raise UserError("the text gives no tokens", where="--text")
    keep = _accepted_inputs(model)
    device = model_device(model)
    inputs = {k: torch.tensor([list(v)], device=device) for k, v in encoding.items()
              if k in ("input_ids", "attention_mask", "token_type_ids") and (keep is None or k in keep)}
    inputs.setdefault("attention_mask", torch.ones(1, len(ids), dtype=torch.long, device=device))
    special_ids = set(tokenizer.all_special_ids)
    mask = encoding.get("special_tokens_mask")
    special = [bool(m) for m in mask] if mask is not None else [i in special_ids for i in ids]
    return Encoded(inputs, _token_labels(tokenizer, ids, spans, segments), special, spans, segments, **extra)


def encode(model, tokenizer, kind: str, text: str, *, pair: str | None = None, chat: bool = False,
           max_length: int | None = None, word_spans: list[tuple[int, int]] | None = None) -> Encoded:
    """Tokenize ``text`` the way the run's task fed its model (``word_spans``: where the words
    of a token-label task are in ``text``)."""
    fast = getattr(tokenizer, "is_fast", False)
    common = {"return_offsets_mapping": fast, "return_special_tokens_mask": True}
    if kind == "label":
        encoding = tokenizer(text, pair, truncation=True, max_length=max_length or MAX_TOKENS, **common)
        sequence_ids = encoding.sequence_ids() if fast else [0] * len(encoding["input_ids"])
        spans = _spans(encoding, lambda i: sequence_ids[i] or 0)
        return _finish(model, tokenizer, encoding, spans, [text] if pair is None else [text, pair])
    if kind == "token_labels":
        if word_spans is None:
            raise ValueError("token_labels needs the task's word_spans")
        words = [text[start:end] for start, end in word_spans]
        if not words:
            raise UserError("the text has no words", where="--text")
        encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length or MAX_TOKENS,
                             **common)
        word_ids = encoding.word_ids() if fast else None
        if word_ids is None:
            raise UserError("explaining token classification needs a fast tokenizer (for word positions)")
        spans = []
        for i, w in enumerate(word_ids):
            s, e = encoding["offset_mapping"][i]
            spans.append((0, word_spans[w][0] + s, word_spans[w][0] + e) if w is not None and e > s else None)
        return _finish(model, tokenizer, encoding, spans, [text], word_ids=word_ids, words=words)
    if kind == "next_token":
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise UserError("the run's tokenizer has no chat template", where="--chat",
                                hint="leave out --chat to explain the raw text")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
            encoding = tokenizer(text, add_special_tokens=False, **common)
        else:
            encoding = tokenizer(text, **common)
        return _finish(model, tokenizer, encoding, _spans(encoding, lambda i: 0), [text])
    raise UserError(f"cannot encode input for explained output {kind!r}")


# -- attention ----------------------------------------------------------------------------------
def use_eager_attention(model) -> None:
    """Switch the model (under any wrapper) to eager attention, which returns its weights."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    setter = getattr(base, "set_attn_implementation", None)
    if getattr(base.config, "_attn_implementation", "eager") == "eager" or setter is None:
        return
    try:
        setter("eager")
    except (ValueError, NotImplementedError) as exc:
        raise UserError(f"cannot switch {type(base).__name__} to eager attention, which explain needs to read "
                        f"attention weights: {exc}") from None


def _forward(model, inputs: dict):
    """The model's output with attentions, fed embeddings like the attribution passes are.
    The embeddings require grad: a bitsandbytes 4-bit layer on CPU repacks its weights for
    inference on its first forward without grad, after which it can no longer backpropagate."""
    import torch

    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.enable_grad():
        output = model(inputs_embeds=embeds, output_attentions=True, **rest)
    return output


def stack_attentions(attentions) -> torch.Tensor:
    """The model's per-layer attention tuple as one ``layers × heads × queries × keys`` float
    tensor (first batch item)."""
    import torch

    if not attentions or any(a is None for a in attentions):
        raise UserError("the model returned no attention weights (its attention implementation does not expose them)")
    return torch.stack([a[0].detach().float().cpu() for a in attentions])


def attention_rollout(attentions: torch.Tensor, residual: float = 0.5, prefix: int = 0) -> torch.Tensor:
    """Attention rollout: ``A'_L @ ... @ A'_1`` where ``A'_l = residual·I + (1 - residual)·mean_heads(A_l)``
    with rows renormalised. ``attentions`` is ``layers × heads × T × (prefix + T)`` (or without the
    heads axis); ``prefix`` leading key columns (prefix tuning) are dropped before rolling out.
    Returns ``T × T``: how much each position draws on each input position through all layers."""
    import torch

    maps = attentions.float()
    if maps.dim() == 4:
        maps = maps.mean(1)
    if maps.dim() != 3:
        raise ValueError("expected layers × [heads ×] T × T attentions")
    maps = maps[..., prefix:]
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    if maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"rollout needs square maps, got {tuple(maps.shape[-2:])} (prefix={prefix})")
    eye = torch.eye(maps.shape[-1])
    result = eye
    for layer in maps:
        mixed = residual * eye + (1 - residual) * layer
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    return result


# -- attributions -------------------------------------------------------------------------------
@dataclass
class Target:
    """One explained output and the attribution of each (real) input token to it."""

    title: str  # e.g. "label positive (p=0.93)", "PER: John Smith", "next token ' Paris' (p=0.41)"
    scores: list[float] = field(default_factory=list)


def _scorer(model, encoded: Encoded, kind: str, spec):
    """``f(inputs_embeds) -> one score per batch row``: the log-probability of the explained output."""
    import torch

    rest = {k: v for k, v in encoded.inputs.items() if k != "input_ids"}
    length = encoded.length

    def score(embeds: torch.Tensor) -> torch.Tensor:
        batch = {k: v.expand(embeds.shape[0], *v.shape[1:]) for k, v in rest.items()}
        logits = model(inputs_embeds=embeds, **batch).logits.float()
        if kind == "label":
            return logits.log_softmax(-1)[:, spec]
        if kind == "token_labels":
            positions, tags = spec
            logits = logits[:, -length:]  # anything the model prepends comes first
            picked = logits.log_softmax(-1)[:, positions, :].gather(-1, torch.tensor(tags, device=logits.device)
                                                                   .view(1, -1, 1).expand(logits.shape[0], -1, 1))
            return picked.squeeze(-1).sum(-1)
        return logits[:, -1].log_softmax(-1)[:, spec]

    return score


def _baseline(model, tokenizer, encoded: Encoded, embeds: torch.Tensor) -> torch.Tensor:
    import torch

    pad = tokenizer.pad_token_id
    if pad is None:
        base = torch.zeros_like(embeds)
    else:
        ids = torch.full_like(encoded.inputs["input_ids"], pad)
        base = model.get_input_embeddings()(ids).detach()
    keep = torch.tensor(encoded.special, device=embeds.device).view(1, -1, 1)
    return torch.where(keep, embeds, base)


def attribute(model, tokenizer, encoded: Encoded, kind: str, spec, *, method: str = "ig",
              steps: int = 32) -> list[float]:
    """Signed attribution of each input token to the output ``spec`` names (class id for
    "label", (positions, tag ids) for "token_labels", next-token id for "next_token")."""
    import torch

    embeds = model.get_input_embeddings()(encoded.inputs["input_ids"]).detach()
    baseline = _baseline(model, tokenizer, encoded, embeds)
    score = _scorer(model, encoded, kind, spec)
    with torch.enable_grad():
        if method == "ig":
            try:
                from captum.attr import IntegratedGradients
            except ImportError:
                raise UserError("integrated gradients need Captum, which is not installed", where="--method",
                                hint="pip install captum, or use --method gradxinput") from None

            attributions = IntegratedGradients(score).attribute(embeds, baselines=baseline, n_steps=steps,
                                                                internal_batch_size=min(steps, 16))
        elif method == "gradxinput":
            inputs = embeds.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(score(inputs).sum(), inputs)
            attributions = grad * inputs.detach()
        else:
            raise UserError(f"unknown attribution method {method!r}", where="--method", hint=f"use one of {METHODS}")
    values = attributions[0].float().sum(-1)
    values = torch.where(torch.tensor(encoded.special, device=values.device), torch.zeros_like(values), values)
    return values.detach().cpu().tolist()


def _entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) word spans of IOB-style tags (B-X / I-X / O; E-/S- read as I-/B-;
    tags without a prefix: runs of the same tag), end exclusive."""
    found: list[list] = []
    previous = "O"
    for i, tag in enumerate(tags):
        if tag == "O":
            previous = tag
            continue
        prefix, dash, kind = tag.partition("-")
        if not dash or len(prefix) != 1:
            prefix, kind = ("I" if tag == previous else "B"), tag
        if prefix in ("I", "E") and found and found[-1][0] == kind and found[-1][2] == i:
            found[-1][2] = i + 1
        else:
            found.append([kind, i, i + 1])
        previous = tag
    return [tuple(e) for e in found]


# -- the whole explanation ----------------------------------------------------------------------
@dataclass
class Explanation:
    kind: str  # what the model outputs: "label", "token_labels" or "next_token"
    encoded: Encoded
    attentions: torch.Tensor  # layers × heads × queries × keys
    virtual: int  # virtual tokens the model put before the input (prompt tuning)
    prefix: int  # key/value prefix positions (prefix tuning)
    prediction: str
    targets: list[Target]
    method: str

    @property
    def query_labels(self) -> list[str]:
        return [f"⟨v{i + 1}⟩" for i in range(self.virtual)] + self.encoded.labels

    @property
    def key_labels(self) -> list[str]:
        return [f"⟨p{i + 1}⟩" for i in range(self.prefix)] + self.query_labels

    def rollout(self) -> torch.Tensor:
        return attention_rollout(self.attentions, prefix=self.prefix)

    def to_json(self, layer: int, head: int) -> dict:
        return {"explained_output": self.kind, "prediction": self.prediction, "method": self.method,
                "tokens": self.encoded.labels, "special": self.encoded.special,
                "virtual_tokens": self.virtual, "prefix_tokens": self.prefix,
                "layers": int(self.attentions.shape[0]), "heads": int(self.attentions.shape[1]),
                "layer": layer, "head": head,
                "targets": [{"title": t.title, "attributions": t.scores} for t in self.targets]}


def explain(model, tokenizer, kind: str, text: str, *, labels: list[str] | None = None, pair: str | None = None,
            chat: bool = False, max_length: int | None = None, method: str = "ig", steps: int = 32,
            word_spans: list[tuple[int, int]] | None = None) -> Explanation:
    """Attention maps and attributions for one input. ``kind`` is what the task's model
    outputs (``Explains.explained_output``)."""
    if kind not in KINDS:
        raise UserError(f"cannot explain a model whose output is {kind!r}",
                        hint=f"explain reads models whose output is one of {', '.join(KINDS)}")
    if method not in METHODS:
        raise UserError(f"unknown attribution method {method!r}", where="--method",
                        hint=f"use one of {', '.join(METHODS)}")
    if steps < 1:
        raise UserError("--steps must be at least 1", where="--steps")
    model.eval()
    use_eager_attention(model)
    encoded = encode(model, tokenizer, kind, text, pair=pair, chat=chat, max_length=max_length, word_spans=word_spans)
    output = _forward(model, encoded.inputs)
    attentions = stack_attentions(output.attentions)
    queries, keys = attentions.shape[-2:]
    virtual, prefix = max(queries - encoded.length, 0), max(keys - queries, 0)
    logits = output.logits[0].detach().float()
    if labels is None:
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [str(id2label.get(i, i)) for i in range(logits.shape[-1])] if kind != "next_token" else None

    def explain_one(title, spec):
        return Target(title, attribute(model, tokenizer, encoded, kind, spec, method=method, steps=steps))

    targets = []
    if kind == "label":
        probabilities = logits.softmax(-1)
        best = int(probabilities.argmax())
        prediction = f"{labels[best]} (p={probabilities[best]:.2f})"
        targets.append(explain_one(f"label {prediction}", best))
    elif kind == "token_labels":
        predicted = logits[-encoded.length:].argmax(-1).tolist()
        first = {}  # word -> position of its first sub-token
        for position, word in enumerate(encoded.word_ids):
            if word is not None and word not in first:
                first[word] = position
        words = sorted(first)
        tags = [labels[predicted[first[w]]] for w in words]
        found = _entities(tags)
        prediction = ", ".join(f"{k}: {' '.join(encoded.words[words[s]] for s in range(s0, e0))}"
                               for k, s0, e0 in found) or "no entities"
        for kind_name, start, end in found:
            positions = [first[words[i]] for i in range(start, end)]
            tag_ids = [predicted[p] for p in positions]
            entity = " ".join(encoded.words[words[i]] for i in range(start, end))
            targets.append(explain_one(f"{kind_name}: {entity}", (positions, tag_ids)))
    else:
        probabilities = logits[-1].softmax(-1)
        best = int(probabilities.argmax())
        token = tokenizer.decode([best])
        prediction = f"next token {token!r} (p={probabilities[best]:.2f})"
        targets.append(explain_one(prediction, best))
    return Explanation(kind, encoded, attentions, virtual, prefix, prediction, targets, method)


def check_explainable(task, where: str | None = None) -> str:
    """What the task's model outputs, or a UserError saying why its runs cannot be explained."""
    from petune.api import Explains, require

    kind = require(task, Explains, where=where).explained_output
    if kind not in KINDS:
        raise UserError(f"task {task.name!r} says its model outputs {kind!r}, which explain does not read",
                        where=where, hint=f"explain reads {', '.join(KINDS)}")
    return kind


def explain_run(run, text: str, **kwargs) -> Explanation:
    """:func:`explain` on a :class:`petune.run_folders.LoadedRun`."""
    kind = check_explainable(run.task, str(run.dir))
    state = run.state or {}
    if kwargs.get("pair") is not None and kind != "label":
        raise UserError("--pair is for classification runs trained on text pairs", where="--pair")
    if kwargs.get("chat") and kind != "next_token":
        raise UserError("--chat is for causal language-model runs", where="--chat")
    spans = run.task.word_spans(text) if kind == "token_labels" else None
    return explain(run.model, run.tokenizer, kind, text, labels=state.get("labels"),
                   max_length=state.get("max_length"), word_spans=spans, **kwargs)


def check_layer_head(explanation: Explanation, layer: int, head: int) -> tuple[int, int]:
    """0-based (layer, head); negative layers count from the top."""
    layers, heads = explanation.attentions.shape[:2]
    if not -layers <= layer < layers:
        raise UserError(f"layer {layer} does not exist: the model has {layers} layers (0 to {layers - 1}, "
                        f"or -1 for the last)", where="--layer")
    if not 0 <= head < heads:
        raise UserError(f"head {head} does not exist: the model has {heads} heads per layer (0 to {heads - 1})",
                        where="--head")
    return layer % layers, head


# -- pictures -----------------------------------------------------------------------------------
def _save_png(figure, path: Path, *, tight: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _heatmap(axes, matrix, x_labels, y_labels, title, virtual: int, prefix: int):
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("attended to (key)")
    axes.set_ylabel("attending (query)")
    n = max(len(x_labels), len(y_labels))
    if n <= _LABELLED_TOKENS:
        size = 9 if n <= 24 else 7 if n <= 40 else 5
        axes.set_xticks(range(len(x_labels)), labels=x_labels, rotation=90, fontsize=size)
        axes.set_yticks(range(len(y_labels)), labels=y_labels, fontsize=size)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    for k in ([prefix - 0.5] if prefix else []) + ([prefix + virtual - 0.5] if virtual else []):
        axes.axvline(k, color="white", linewidth=0.8)
    if virtual:
        axes.axhline(virtual - 0.5, color="white", linewidth=0.8)
    return image


def plot_attention(explanation: Explanation, path: Path, layer: int = -1, head: int = 0,
                   title: str | None = None) -> Path:
    """Three heatmaps: layer/head, the layer's head average, and rollout across layers.
    The PNG is always ``ATTENTION_FIGSIZE × DPI`` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layer, head = check_layer_head(explanation, layer, head)
    layers, heads = explanation.attentions.shape[:2]
    keys, queries = explanation.key_labels, explanation.query_labels
    figure = Figure(figsize=ATTENTION_FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3)
    v, p = explanation.virtual, explanation.prefix
    _heatmap(panels[0], explanation.attentions[layer, head].numpy(), keys, queries, f"layer {layer}, head {head}", v, p)
    _heatmap(panels[1], explanation.attentions[layer].mean(0).numpy(), keys, queries,
             f"layer {layer}, mean of {heads} heads", v, p)
    _heatmap(panels[2], explanation.rollout().numpy(), queries, queries, f"rollout over {layers} layers", v, 0)
    for axes in panels:
        figure.colorbar(axes.images[0], ax=axes, fraction=0.046, pad=0.02)
    figure.suptitle(title or f"Attention — prediction: {explanation.prediction}", fontsize=12)
    return _save_png(figure, path, tight=False)


def plot_attributions(explanation: Explanation, path: Path, title: str | None = None) -> Path:
    """One row per explained output, one column per input token; colour = attribution scaled
    by the row's largest magnitude (green supports the output, red opposes it)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = explanation.encoded.labels
    rows = explanation.targets
    n = len(labels)
    figure = Figure(figsize=(min(max(6.0, 0.5 * n + 2.5), 40.0), 1.6 + 0.55 * max(len(rows), 1)), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if not rows:
        axes.axis("off")
        axes.text(0.5, 0.5, f"nothing to attribute: {explanation.prediction}", ha="center", va="center")
        return _save_png(figure, path, tight=True)
    values = np.array([r.scores for r in rows], dtype=float)
    scaled = values / np.maximum(np.abs(values).max(axis=1, keepdims=True), 1e-12)
    image = axes.imshow(scaled, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n), labels=labels, rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center",
                    fontsize=9 if n <= 40 else 6)
    axes.set_yticks(range(len(rows)), labels=[r.title for r in rows], fontsize=9)
    if n <= 40:
        for i in range(len(rows)):
            for j in range(n):
                if not explanation.encoded.special[j]:
                    axes.text(j, i, f"{scaled[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                              color="black" if abs(scaled[i, j]) < 0.75 else "white")
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01, label="attribution (row-scaled)")
    method = "integrated gradients" if explanation.method == "ig" else "gradient × input"
    axes.set_title(title or f"Token attributions ({method})", fontsize=11)
    return _save_png(figure, path, tight=True)


# -- terminal -----------------------------------------------------------------------------------
def _colour(value: float) -> str | None:
    """A background for a scaled attribution in [-1, 1]: green for, red against."""
    strength = min(abs(value), 1.0)
    if strength < 0.05:
        return None
    fade = round(255 * (1 - 0.85 * strength))
    return f"black on rgb({fade},{255},{fade})" if value > 0 else f"black on rgb({255},{fade},{fade})"


def render_attributions(encoded: Encoded, scores: list[float]) -> Text:
    """The input text with each token's background coloured by its attribution."""
    from rich.text import Text

    peak = max((abs(s) for s in scores), default=0.0) or 1.0
    text = Text()
    if all(span is None for span in encoded.spans):  # slow tokenizer: tokens separated by spaces
        for label, score, special in zip(encoded.labels, scores, encoded.special):
            text.append(label, style="dim" if special else _colour(score / peak))
            text.append(" ")
        return text
    for segment_index, segment in enumerate(encoded.segments):
        if segment_index:
            text.append("  ⟂  ", style="dim")
        cursor = 0
        for span, score in zip(encoded.spans, scores):
            if span is None or span[0] != segment_index or span[1] < cursor:
                continue
            piece = segment[span[1]:span[2]]
            start = span[1] + len(piece) - len(piece.lstrip())  # a byte-level token's leading space stays plain
            text.append(segment[cursor:start])
            text.append(segment[start:span[2]], style=_colour(score / peak))
            cursor = span[2]
        text.append(segment[cursor:])
    return text


def top_tokens(encoded: Encoded, scores: list[float], k: int = 5) -> list[tuple[str, float]]:
    order = sorted((i for i in range(len(scores)) if not encoded.special[i]), key=lambda i: -scores[i])
    return [(encoded.labels[i], scores[i]) for i in order[:k]]


def write_json(explanation: Explanation, path: Path, layer: int, head: int) -> None:
    from petune import artifacts

    artifacts.write_text(Path(path), json.dumps(explanation.to_json(layer, head), indent=2, ensure_ascii=False) + "\n")
