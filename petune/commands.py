"""Commands on a finished run folder: eval, predict, generate, chat (merge: petune/merge.py).

Each needs only the run folder and the input given; the task plugin does the work.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rich.markup import escape

from petune import hookimpl
from petune.api import HELD_OUT_NOTE, Generates, Predicts, require
from petune.console import err, metrics_table, out
from petune.errors import UserError


def _load(run_dir, **kwargs):
    from petune.plugins import get_host
    from petune.run_folders import load_run

    with err.status(f"loading {run_dir} ..."):
        return load_run(run_dir, get_host(), **kwargs)


def cmd_eval(args) -> int:
    from petune import artifacts, datacache
    from petune.trainer_setup import prepare_trainer, training_arguments

    run = _load(args.run_dir)
    options = run.recipe.task if args.data is None else run.task.with_test_file(run.recipe.task, args.data.resolve())
    out_dir = Path(args.out) if args.out else run.dir / "eval"
    prepared = datacache.prepare(run.task, "held_out_data", options, run.tokenizer,
                                 lambda tok: run.task.held_out_data(options, tok, run.state),
                                 settings=run.recipe.data, extra={"state": run.state})
    data, tokenizer = prepared.data, prepared.tokenizer
    if HELD_OUT_NOTE in data.notes:
        err.print(f"[yellow]note:[/] {escape(data.notes[HELD_OUT_NOTE])}")
    if data.train is None:  # some trainers (TRL's) insist on a training set; eval never trains on it
        data = dataclasses.replace(data, train=data.test if data.test is not None else data.validation)
    args_dict = training_arguments(run.recipe, out_dir, run.task, data)
    args_dict.update(eval_strategy="no", load_best_model_at_end=False, report_to="none")
    trainer = run.task.make_trainer(model=run.model, tokenizer=tokenizer, data=data, options=options,
                                    args=args_dict, callbacks=[])
    prepare_trainer(trainer)
    metrics = run.task.evaluate(trainer, data, options, out_dir)
    artifacts.write_json(out_dir / "metrics.json", metrics)
    out.print(metrics_table(f"Evaluation — {run.dir}", metrics))
    return 0


_COLUMNAR = {".parquet", ".pq", ".arrow", ".feather"}


def read_input(path: Path) -> str:
    """The text of ``petune predict``'s input file, unpacked when its name ends in .gz or .zst
    (tasks read its format from the name without that suffix, as for training files)."""
    suffix = path.suffix.lower()
    if suffix in _COLUMNAR or path.is_dir() or (suffix in (".gz", ".zst") and Path(path.stem).suffix in _COLUMNAR):
        raise UserError("predict reads text inputs (JSON Lines, JSON, CSV/TSV, plain lines; also .gz/.zst), "
                        "not Parquet or Arrow", where=str(path),
                        hint="write the rows as JSON Lines, e.g. python -c \"import pandas as p; "
                             f"p.read_parquet('{path.name}').to_json('rows.jsonl', orient='records', lines=True)\"")
    try:
        data = path.read_bytes()
        if suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        elif suffix == ".zst":
            data = _unzstd(data)
        return data.decode("utf-8")
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError("input file not found", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {exc.start})", where=str(path),
                        hint="save the file as UTF-8") from None
    except Exception as exc:  # noqa: BLE001 - gzip: OSError, EOFError; zstandard.ZstdError
        raise UserError(f"cannot unpack the file ({exc or type(exc).__name__})", where=str(path),
                        hint="check that it is complete (gzip -t / zstd -t)") from None


def _unzstd(data: bytes) -> bytes:
    """Every zstd frame of ``data`` (as zstd -d reads them); a frame cut short is an EOFError."""
    import zstandard

    parts = []
    while data:
        frame = zstandard.ZstdDecompressor().decompressobj()
        parts.append(frame.decompress(data))
        if not frame.eof:
            raise EOFError("the compressed data ends early")
        data = frame.unused_data
    return b"".join(parts)


def cmd_predict(args) -> int:
    if args.input_file is not None and args.input is not None and args.input_file != args.input:
        raise UserError(f"two inputs: {args.input_file} and --input {args.input}", hint="give one")
    given = args.input if args.input is not None else args.input_file
    from_file = given is not None and str(given) != "-"
    text, source = (read_input(Path(given)), str(given)) if from_file else (None, "<stdin>")  # before the model loads
    run = _load(args.run_dir)
    predict = require(run.task, Predicts, where=str(run.dir)).predict
    if not from_file:
        text = sys.stdin.read()
    rows = run.task.parse_inputs(run.recipe.task, text, source)
    predictions = predict(run.model, run.tokenizer, run.recipe.task, run.state, rows)
    formatted = run.task.format_predictions(rows, predictions)
    if args.output:
        from petune import artifacts

        artifacts.write_text(Path(args.output), formatted)
        err.print(f"wrote {len(predictions)} predictions to {escape(str(args.output))}")
    else:
        sys.stdout.write(formatted)
    return 0


def _generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    run = _load(args.run_dir)
    generate = require(run.task, Generates, where=str(run.dir)).generate
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    text = generate(run.model, run.tokenizer, run.recipe.task, run.state, messages, **_generation_kwargs(args))
    out.print(escape(text), soft_wrap=True)
    return 0


def cmd_chat(args) -> int:
    run = _load(args.run_dir)
    generate = require(run.task, Generates, where=str(run.dir)).generate
    messages = [{"role": "system", "content": args.system}] if args.system else []
    err.print("[dim]chat with the run; empty line or Ctrl-D to quit, /reset to start over[/]")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = generate(run.model, run.tokenizer, run.recipe.task, run.state, messages, **_generation_kwargs(args))
        messages.append({"role": "assistant", "content": reply})
        out.print(f"[bold cyan]model>[/] {escape(reply)}")
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    add_to(subparsers)


def add_to(sub) -> None:
    def run_arg(p):
        p.add_argument("run_dir", type=Path, help="a finished run folder")
        return p

    p = run_arg(sub.add_parser("eval", help="re-evaluate a finished run"))
    p.add_argument("--data", type=Path, help="evaluate on this file instead of the recipe's test split")
    p.add_argument("--out", type=Path, help="where to write the reports (default RUN_DIR/eval)")
    p.set_defaults(func=cmd_eval)

    p = run_arg(sub.add_parser("predict", help="predict labels / entities for an input file or stdin"))
    p.add_argument("input_file", nargs="?", type=Path, metavar="INPUT", help="input file (default: stdin)")
    p.add_argument("--input", type=Path, help="the same as INPUT")
    p.add_argument("--output", type=Path, help="write predictions here (default: stdout)")
    p.set_defaults(func=cmd_predict)

    for name, help_text, func in (("generate", "generate an answer to one prompt", cmd_generate),
                                  ("chat", "chat interactively with a causal-LM run", cmd_chat)):
        p = run_arg(sub.add_parser(name, help=help_text))
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the user message")
        p.add_argument("--system", help="a system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.set_defaults(func=func)
