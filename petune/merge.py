"""``petune merge``: fold a run's trained weights into its base, write a standalone
transformers folder, and check that folder computes what the run computes.

The check loads what was written the way any user would (``AutoModelFor...from_pretrained``,
no petune, no peft), runs a few inputs through it and through the run as trained (adapter on
the base), and compares every output whose name ends in ``logits`` (LM logits, class logits,
token-class logits, start/end logits): the largest difference, argmax agreement, and for
models that generate, the greedy continuations. A difference beyond the tolerance of the
dtype is exit 2 (unless ``--force``), naming the weights that differ from the in-memory merge.

What varies comes through the plugin contract: the strategy's ``merge`` (a strategy whose
artifact is a whole model has nothing to fold: it is copied and verified; one that cannot be
merged refuses with its reason) and the task's ``verification_texts``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from petune import hookimpl
from petune.api import model_device
from petune.console import err, out
from petune.errors import UserError

#: Largest tolerated logit difference, relative to the largest |logit| of the reference (at
#: least 1), per dtype the run computes in. Merging changes the order of floating-point
#: operations (x·(W + s·BA) instead of x·W + s·(x·A)·B) and rounds W + s·BA once to the
#: dtype: float32 stays near 1e-6, half precision near its rounding step (2^-8 for bfloat16,
#: 2^-11 for float16) times the depth of the model.
TOLERANCE = {"float32": 1e-3, "float64": 1e-6, "bfloat16": 6e-2, "float16": 1.5e-2}
GREEDY_TOKENS = 8  # enough to see a continuation drift, cheap on a CPU


@dataclass
class Comparison:
    """One output of one input, run through the run and through the merged folder."""

    text: str
    output: str
    max_diff: float
    scale: float
    argmax_same: int
    positions: int
    greedy_same: bool | None = None  # None: the model does not generate


@dataclass
class Verification:
    dtype: str
    tolerance: float
    rows: list[Comparison] = field(default_factory=list)
    weights_differ: list[tuple[str, float]] = field(default_factory=list)  # (name, max |Δ|)
    missing: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max((r.max_diff for r in self.rows), default=0.0)

    @property
    def scale(self) -> float:
        return max((r.scale for r in self.rows), default=1.0)

    @property
    def ok(self) -> bool:
        # saving and loading is exact: a weight unlike the merge in memory is damage even where
        # the few check inputs do not show it
        return (not self.missing and not self.weights_differ and all(math.isfinite(r.max_diff) for r in self.rows)
                and self.max_diff <= self.tolerance * self.scale)

    def summary(self) -> str:
        argmax = sum(r.argmax_same for r in self.rows), sum(r.positions for r in self.rows)
        greedy = [r.greedy_same for r in self.rows if r.greedy_same is not None]
        within = "within" if self.max_diff <= self.tolerance * self.scale else "beyond"
        text = (f"largest logit difference {self.max_diff:.3g}, {within} the {self.dtype} tolerance "
                f"{self.tolerance * self.scale:.3g} ({self.tolerance:g} × the largest |logit|); argmax agrees at "
                f"{argmax[0]}/{argmax[1]} positions")
        if greedy:
            text += f"; greedy continuations equal for {sum(greedy)}/{len(greedy)} inputs"
        return text


# -- inputs and outputs ---------------------------------------------------------------------
def encode(tokenizer, model, text: str) -> dict:
    """One input as model keyword arguments; an encoder-decoder also gets decoder inputs
    (its start token followed by the input's own tokens) so every decoder position is compared."""
    import inspect

    import torch

    batch = dict(tokenizer(text, return_tensors="pt", truncation=True, max_length=64))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    batch = {k: v for k, v in batch.items() if k in accepted}  # e.g. token_type_ids only where taken
    config = base.config
    if getattr(config, "is_encoder_decoder", False):
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        ids = batch["input_ids"][:, : batch["input_ids"].shape[1] - 1]
        batch["decoder_input_ids"] = torch.cat([torch.full((1, 1), int(start or 0)), ids], dim=1)
    return batch


def logits_of(model, batch: dict) -> dict:
    """Every floating output whose name ends in 'logits', as float32 on the CPU."""
    import torch

    with torch.no_grad():
        output = model(**{k: v.to(model_device(model)) for k, v in batch.items()})
    found = {name: value.detach().float().cpu() for name, value in output.items()
             if name.endswith("logits") and torch.is_tensor(value) and value.is_floating_point()}
    if not found:
        raise UserError(f"{type(model).__name__} returns no logits to compare (outputs: {', '.join(output.keys())})")
    return found


def greedy(model, tokenizer, batch: dict) -> list[int] | None:
    """The first greedy tokens for models that generate, else None."""
    import torch

    can = getattr(model, "can_generate", None)
    if not (can and can()):
        return None
    kwargs = {k: v.to(model_device(model)) for k, v in batch.items() if k != "decoder_input_ids"}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ids = model.generate(**kwargs, max_new_tokens=GREEDY_TOKENS, do_sample=False, num_beams=1,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return ids[0].tolist()




def load_plain(folder: Path, dtype):
    """The merged folder as a user loads it: transformers' Auto class for its architecture,
    with the loading report (weights missing from the folder are freshly initialised)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    arch = (config.architectures or [None])[0]
    loader = auto_class_for(arch) or getattr(transformers, arch or "", None)
    if loader is None:
        raise UserError(f"transformers has no class for architecture {arch!r}", where=str(folder / "config.json"))
    model, info = loader.from_pretrained(folder, dtype=dtype, trust_remote_code=False, output_loading_info=True)
    return model.eval(), info


_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                 "AutoModelForQuestionAnswering", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                 "AutoModelForImageTextToText")


def auto_class_for(arch: str | None):
    """The ``AutoModelFor...`` class whose mapping holds ``arch`` (what a model card would tell
    a user to call), or None."""
    import transformers

    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", {})
        if arch in set(mapping.values()):
            return auto
    return None


# -- the check ------------------------------------------------------------------------------
def reference_outputs(model, tokenizer, texts: list[str]) -> list[tuple[dict, dict, list[int] | None]]:
    """(input, logits, greedy tokens) of each text through the run's model, before merging:
    merging folds the adapter into the very same modules."""
    results = []
    for text in texts:
        batch = encode(tokenizer, model, text)
        results.append((batch, logits_of(model, batch), greedy(model, tokenizer, batch)))
    return results


def verify(reference, texts, merged_in_memory, folder: Path, tokenizer, dtype) -> Verification:
    """Compare the folder, loaded by plain transformers, with the run's outputs (``reference``)
    and its weights with the in-memory merge (to name what differs)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    check = Verification(dtype=name, tolerance=TOLERANCE.get(name, 1e-3))
    model, info = load_plain(folder, dtype)
    check.missing = sorted(info.get("missing_keys") or [])
    for text, (batch, expected, tokens) in zip(texts, reference):
        got = logits_of(model, batch)
        generated = greedy(model, tokenizer, batch) if tokens is not None else None
        for output, want in expected.items():
            have = got.get(output)
            if have is None or have.shape != want.shape:
                check.rows.append(Comparison(text, output, math.inf, 1.0, 0, want[..., 0].numel()))
                continue
            diff = (have - want).abs().max().item() if want.numel() else 0.0
            same = (have.argmax(-1) == want.argmax(-1))
            check.rows.append(Comparison(text, output, diff if math.isfinite(diff) else math.inf,
                                         max(1.0, want.abs().max().item()), int(same.sum()), same.numel(),
                                         None if tokens is None else generated == tokens))
            tokens = None  # one greedy comparison per input, on its first output
    mine = merged_in_memory.state_dict()
    for key, value in model.state_dict().items():
        other = mine.get(key)
        if other is not None and other.shape == value.shape and value.is_floating_point():
            delta = (value.float() - other.detach().float().cpu()).abs().max().item() if value.numel() else 0.0
            if delta > 0:
                check.weights_differ.append((key, delta))
    check.weights_differ.sort(key=lambda kv: -kv[1])
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return check


def verification_table(check: Verification) -> Table:
    table = Table(title="Merge check: the run (adapter on base) vs the merged folder loaded by transformers",
                  title_justify="left")
    for col, justify in (("input", "left"), ("output", "left"), ("max |Δ|", "right"), ("argmax agrees", "right"),
                         ("greedy equal", "right")):
        table.add_column(col, justify=justify)
    for row in check.rows:
        text = row.text if len(row.text) <= 40 else row.text[:39] + "…"
        bad = not math.isfinite(row.max_diff) or row.max_diff > check.tolerance * check.scale
        diff = "shape differs" if not math.isfinite(row.max_diff) else f"{row.max_diff:.3g}"
        table.add_row(escape(text), row.output, f"[red]{diff}[/]" if bad else diff, f"{row.argmax_same}/{row.positions}",
                      "—" if row.greedy_same is None else ("yes" if row.greedy_same else "[yellow]no[/]"))
    return table


def failure(check: Verification, folder: Path) -> UserError:
    parts = []
    if check.missing:
        parts.append(f"weights missing from the folder (transformers initialised them at random): "
                     f"{', '.join(check.missing[:5])}")
    worst = max(check.rows, key=lambda r: r.max_diff, default=None)
    if worst is not None and worst.max_diff > check.tolerance * check.scale:
        what = "has a different shape" if not math.isfinite(worst.max_diff) else f"differs by {worst.max_diff:.3g}"
        parts.append(f"output {worst.output!r} for input {worst.text[:40]!r} {what}; the {check.dtype} tolerance "
                     f"is {check.tolerance * check.scale:.3g} ({check.tolerance:g} × the largest |logit|)")
    if check.weights_differ:
        parts.append("weights that differ from the merge in memory: " + ", ".join(
            f"{k} (max |Δ| {d:.3g})" for k, d in check.weights_differ[:5]))
    return UserError("the merged model does not compute what the run computes: " + "; ".join(parts), where=str(folder),
                     hint="re-run the merge (a copy or a disk may have damaged the files); --force keeps the folder "
                          "anyway")


# -- the command ----------------------------------------------------------------------------
#: written into every merged folder: what ``--overwrite`` may replace (a folder petune merge wrote)
MERGE_MARK = "petune_merge.json"


def not_a_merged_folder(path: Path) -> str | None:
    """Why ``path`` is not a folder ``petune merge`` wrote; None when it is."""
    if (path / MERGE_MARK).is_file() and (path / "config.json").is_file():
        return None
    return f"it is not a folder petune merge wrote (it has no {MERGE_MARK})"


def merge_run(run_dir: Path, out_dir: Path, *, overwrite: bool = False, force: bool = False,
              verify_only: bool = False) -> Verification:
    """Merge the run into ``out_dir`` (or, with ``verify_only``, check a folder already there)."""
    from petune import artifacts
    from petune.plugins import get_host
    from petune.run_folders import load_run, read_finished_run
    from petune.runner import inputs_of

    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # `--out .` has a name to write beside
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("--out is a file; merge writes a folder", where=str(out_dir), hint="pick a folder for --out")
    if verify_only:
        if not (out_dir / "config.json").is_file():
            raise UserError("no merged model to verify here (no config.json)", where=str(out_dir),
                            hint="run petune merge without --verify-only first")
    elif out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError("merge output folder already exists", where=str(out_dir),
                            hint="pass --overwrite or pick another --out")
        recipe = read_finished_run(Path(run_dir), get_host())[0]
        artifacts.refuse_to_replace(out_dir, [Path(run_dir), *inputs_of(recipe)], not_a_merged_folder,
                                    reader="the merge", hint="--overwrite replaces only a folder petune merge wrote; "
                                                             "pick a new --out")
    if not verify_only:
        artifacts.check_writable(out_dir / "config.json")
    host = get_host()
    # Merge into the trained base as plain 16/32-bit weights: folding into 4-bit weights would
    # round the update away, folding into the original checkpoint gives a model never trained.
    with err.status(f"loading {run_dir} ..."):
        run = load_run(run_dir, host, dequantized=True)
    if run.strategy.load_kwargs(run.recipe.strategy).get("quantization_config") is not None:
        err.print("[yellow]note[/]: the adapter was trained on a quantised base; it is merged into that base "
                  "dequantised to 16/32-bit (the weights the run computed with), never into 4-bit weights, which "
                  "would round the update away.")
    texts = run.task.verification_texts(run.recipe.task, run.state)
    with err.status("running the check inputs through the run ..."):
        reference = reference_outputs(run.model, run.tokenizer, texts)
    dtype = next(run.model.parameters()).dtype
    # A strategy that saves a whole model has nothing to fold in: its model is copied and checked.
    with host.blame("strategy", run.strategy.name, "merge"):
        merged = run.model if run.strategy.artifact == "model" else run.strategy.merge(run.model)
    merged.eval()

    if not verify_only:
        def fill(tmp: Path):
            merged.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            generation = getattr(merged, "generation_config", None)
            if generation is not None and getattr(merged, "can_generate", lambda: False)():
                generation.save_pretrained(tmp)
            artifacts.write_json(tmp / MERGE_MARK, {"run": str(Path(run_dir).resolve()), "written": artifacts.now()})

        artifacts.write_dir(out_dir, fill)
    if verify_only:
        refuse_another_model(out_dir, merged.config)
    with err.status("loading the merged folder with transformers and comparing ..."):
        check = verify(reference, texts, merged, out_dir, run.tokenizer, dtype)
    out.print(verification_table(check))
    if not check.ok and not force:
        raise failure(check, out_dir)
    if check.ok:
        out.print(f"[green]verified[/]: {check.summary()}")
    else:
        out.print(f"[yellow]kept despite the difference (--force)[/]: {check.summary()}")
    if not verify_only:
        out.print(f"[green]merged[/] model written to [bold]{escape(str(out_dir))}[/] "
                  f"(load with transformers' from_pretrained)")
    return check


def refuse_another_model(folder: Path, config) -> None:
    """``--verify-only`` on a folder that is not this run's merge (another architecture, head or
    vocabulary) is a user error saying so, not a crash feeding the run's inputs to it."""
    import json

    try:
        theirs = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"config.json cannot be read ({exc})", where=str(folder / "config.json")) from None
    ours = config.to_dict()
    differ = [f"{key} {theirs.get(key)!r} (the run: {ours.get(key)!r})"
              for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
              if key in ours and theirs.get(key, ours[key]) != ours[key]]
    if differ:
        raise UserError("the folder holds another model, not this run's merge: " + ", ".join(differ),
                        where=str(folder), hint="give the --out the merge wrote, or merge again without --verify-only")


def cmd_merge(args) -> int:
    merge_run(args.run_dir, Path(args.out), overwrite=args.overwrite, force=args.force, verify_only=args.verify_only)
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a run into a standalone transformers model and verify it")
    p.add_argument("run_dir", type=Path, help="a finished run folder")
    p.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace a folder already at --out")
    p.add_argument("--force", action="store_true", help="keep the merged folder even if the check finds a difference")
    p.add_argument("--verify-only", action="store_true",
                   help="write nothing: check the merged folder already at --out against the run")
    p.set_defaults(func=cmd_merge)
