"""The `scc` command line: one parser, one module per command, each with `add_parser(sub)` and `run(args) -> int`.

    demo.py      scc demo         a bundled model on its held-out images (the first command of the README)
    classify.py  scc classify     image files through a defended classifier
    evaluate.py  scc eval         paper and adaptive protocols
    bench.py     scc bench        per-image latency (Table 4)
    export.py    scc export       ONNX file / Triton model repository
    serve.py     scc serve        HTTP service on Ray Serve
    loadtest.py  scc loadtest     load test of a running service
    train.py     scc train-tiny   retrain a bundled model
    finetune.py  scc finetune     fine-tune a vision encoder (CLIP-FT, TeCoA, PMG-AFT, FARE), DDP under torchrun
    args.py      what every command shares (a leaf: imports nothing above scc's foundation)

User errors (bad files, unknown models, empty labels, bad flag values, missing extras, ...) print one line
`scc: error: ...` and exit 2; nothing is computed before every argument and output path has been checked.
The top layer: it imports every application lazily, inside `run`, so `scc --help` loads no model code.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import SccError
from . import bench, classify, demo, evaluate, export, finetune, loadtest, serve, train
from .args import Parser, version

COMMANDS = (demo, classify, evaluate, bench, export, serve, loadtest, train, finetune)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="scc", description="Test-time adversarial defenses for CLIP (SCC, TTC, R-TPT): run, evaluate, "
                                        "benchmark, export and serve them")
    ap.add_argument("--version", action="version", version=version())
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SccError as err:
        print(f"scc: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help / --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt:
        _forget_interrupt()
        return 130


def _forget_interrupt() -> None:
    """Let exit status 130 stand. CPython remembers a KeyboardInterrupt that left code a C extension ran through
    PyRun_String (tracing does) as "unhandled", although it was caught here, and then ends the process with SIGINT
    (status -2) instead of the status returned; one completed PyRun_SimpleString resets that flag."""
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"pass")


if __name__ == "__main__":
    sys.exit(main())
