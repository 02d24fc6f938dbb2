"""Runs cases, each in a fresh process of its own.

``python -m benchmarks.worker --serve`` is a small fork server: it imports the heavy
libraries once, then for every job line on stdin forks a child that runs one case and
writes its result to a JSON file, and answers with a line when the child is gone. No
case can inflate another's peak memory, and CI does not pay torch's import time twenty
times. It serves CPU runs only: peft imports bitsandbytes, which initialises CUDA on
import on a GPU machine, and a child forked after that dies ("Cannot re-initialize CUDA
in forked subprocess"). :func:`start_method` says which way a device's cases run, and the
server refuses to fork once CUDA is initialised in it.
``python -m benchmarks.worker --case JSON --result FILE`` runs one case in a fresh
interpreter (spawn): every CUDA case, and every case where there is no ``fork``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def start_method(device: str) -> str:
    """How a case on ``device`` gets its process: ``"fork"`` from the server (CPU, where the
    platform forks) or ``"spawn"``, a fresh interpreter (CUDA: nothing may fork once CUDA can
    be initialised, and importing the libraries a case needs can initialise it)."""
    if device.startswith("cuda") or not hasattr(os, "fork"):
        return "spawn"
    return "fork"


def cuda_initialised() -> bool:
    """Whether this process holds a CUDA context (without importing torch if it has not been)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def refuse_fork(job: dict, proto) -> bool:
    """Answer ``job`` with a failed result instead of forking when this process holds a CUDA
    context (a forked child could not use CUDA). True when refused."""
    if not cuda_initialised():
        return False
    _write_result(job["result"], {"case": job["case"], "ok": False, "error": (
        "the fork server holds a CUDA context, so a forked case could not use CUDA; CUDA cases run spawned "
        "(benchmarks.worker.start_method)")})
    print(json.dumps({"pid": 0}), file=proto, flush=True)
    print(json.dumps({"done": 0, "status": 1}), file=proto, flush=True)
    return True


def _quiet_stdout():
    """Keep fd 1 for the protocol; everything printed goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    return proto


def run_case(case_dict: dict) -> dict:
    from . import baseline, petune_side
    from .harness import Case

    case = Case(**case_dict)
    try:
        return (petune_side if case.side == "petune" else baseline).run(case)
    except BaseException as exc:  # noqa: BLE001 — every failure becomes a row saying why
        oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
        return {"case": case_dict, "ok": False, "oom": oom, "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-8000:]}


def _redirect(log_path: str) -> None:
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _write_result(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=str)
    os.replace(tmp, path)


def _child(job: dict) -> None:
    _redirect(job["log"])
    _write_result(job["result"], run_case(job["case"]))


def serve() -> None:
    proto = _quiet_stdout()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # imported once here, inherited by every forked case
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from . import baseline, petune_side  # noqa: F401

    print(json.dumps({"ready": True}), file=proto, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if refuse_fork(job, proto):
            continue
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(job)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), file=proto, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"done": pid, "status": os.waitstatus_to_exitcode(status)}), file=proto, flush=True)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--case", help="case as JSON")
    parser.add_argument("--result", help="write the result here")
    parser.add_argument("--log", help="send output here")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    job = {"case": json.loads(args.case), "result": args.result, "log": args.log}
    if args.log:
        _redirect(args.log)
    _write_result(job["result"], run_case(job["case"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
