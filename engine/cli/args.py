"""The vocabulary every `scc` command shares, written once. A leaf: it imports only the standard library and scc's
foundation modules (errors, validation), never a command or an application package.

    Parser / Formatter         argparse with one-line `scc: error:` errors and defaults in --help
    deprecated_flag            an old flag kept for one release: it sets the new one after one warning line
    positive_int, seed_int ... argparse types that refuse 0 / negative / out-of-range integers with the value
    add_common                 --threads, --quiet, --version (and --json PATH|-) on a command
    add_model_args, ...        --model/--pretrained/--device/--seed, --dtype, --labels/--labels-file, --templates
    check_output, write_json   --json PATH (a file) or `-` (stdout), checked before the work starts
    parse_labels, parse_templates, apply_threads, status
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import SccError
from ..validation import check_device, check_labels, check_templates

TINY_NAME = "scc-tiny-digits"  # the default model (scc.models.TINY_NAME; not imported: models pulls in torch)
BUNDLED = ("scc-tiny-digits", "scc-tiny-fashion")
DEFENSE_CHOICES = ("none, ttc, scc, scc-latency, rtpt, anti-adv, anti-adv-ttc-budget, hd, hd-ttc-budget, doc, dbd, "
                   "agc, rn")
INT64_MAX = 2 ** 63 - 1  # seeds: torch generators and scc.draws.derive_seed take 63-bit values
COUNT_MAX = 2 ** 31 - 1  # images, batch sizes, steps, threads, ports: anything larger is a typo


def version() -> str:
    from .. import __version__

    return f"scc {__version__}"


# ----------------------------------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------------------------------
class Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (unless the help text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS or action.nargs == 0 or action.required
                or "default" in text.lower()
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are SccErrors: one line `scc: error: ...`, exit 2, no usage dump.

    `replaced_by`: set on a (sub)command kept for one release under its old name; parsing it prints one
    `scc: warning: <old> is deprecated; use <new>` line first."""

    replaced_by: str | None = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if self.replaced_by:
            warn_deprecated(self.prog, self.replaced_by)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if "expected one argument" in message:
            message += " (a value that starts with '-' needs '=', e.g. --eps=-4/255)"
        raise SccError(f"{message} (see `{self.prog} --help`)")


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr for an old spelling kept for one release: `scc: warning: OLD is deprecated; use NEW`."""
    print(f"scc: warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


class _DeprecatedFlag(argparse.Action):
    """An old flag kept for one release: one warning line, then the new flag's destination gets the value (through
    `convert`, when the units changed)."""

    def __init__(self, option_strings, dest, new: str, convert=None, **kwargs):
        self.new, self.convert = new, convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.new)
        setattr(namespace, self.dest, values if self.convert is None else self.convert(values))


def deprecated_flag(p: argparse.ArgumentParser, old: str, new: str, type=None, convert=None) -> None:
    """Keep `old` (hidden from --help) as an alias of the already added flag `new` for one release: it takes a
    value of `type` (default: new's type and choices), `convert`s it to new's units, and prints one warning line.

        deprecated_flag(p, "--max-seconds", "--max-time-s")
        deprecated_flag(p, "--queue-delay-us", "--queue-delay-ms", type=nonnegative_int, convert=lambda us: us / 1e3)
    """
    action = next(a for a in p._actions if new in a.option_strings)
    same = type is None and convert is None
    p.add_argument(old, dest=action.dest, action=_DeprecatedFlag, new=new, convert=convert,
                   type=action.type if type is None else type, choices=action.choices if same else None,
                   metavar=action.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def int_type(minimum: int, maximum: int, what: str, largest: str | None = None):
    """An argparse type: an integer in [minimum, maximum], else a one-line error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {largest or maximum}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = int_type(1, COUNT_MAX, "a positive integer")
nonnegative_int = int_type(0, COUNT_MAX, "an integer >= 0")
seed_int = int_type(0, INT64_MAX, "an integer >= 0", largest="2**63-1")
port_int = int_type(1, 65535, "a port number in 1..65535")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


positive_float.__name__ = "a positive number"


def nonnegative_float(text: str) -> float:
    try:
        return 0.0 if float(text) == 0 else positive_float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None


nonnegative_float.__name__ = "a number >= 0"


def add_common(p: argparse.ArgumentParser, json_output: bool = True, threads: bool = True,
               threads_default: int | None = None) -> None:
    """--threads (where the command computes), --quiet, --version, and --json PATH|- on a command."""
    if threads:
        p.add_argument("--threads", type=positive_int, default=threads_default, metavar="N",
                       help="CPU threads for torch (torch.set_num_threads) and ONNX Runtime; recorded in JSON "
                            "reports. On a machine shared with other work, 1 is often several times faster "
                            + ("(default: torch's own choice, one per core)" if threads_default is None
                               else f"(default: {threads_default})"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines: results, warnings "
                                                        "and errors only")
    p.add_argument("--version", action="version", version=version())
    if json_output:
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                       help="write the JSON report to PATH, or to stdout with `-` (a bare --json means `-`); "
                            "the folder must exist; checked before the run (default: no JSON)")


def add_model_args(p: argparse.ArgumentParser, model_default: str | None = None, seed_default: int | None = 0,
                   seed_help: str = "seed of the defenses' random draws, the attacks and random weights") -> None:
    p.add_argument("--model", default=model_default,
                   help=f"open_clip model name (ViT-B-32, RN50, ...) or a bundled model ({', '.join(BUNDLED)}) "
                        f"(default: {model_default or TINY_NAME})")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai), a local checkpoint path (.safetensors/.pt), or none "
                        "(random weights drawn with --seed) (default: the bundled weights for a bundled model, "
                        "random otherwise)")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=seed_default, help=seed_help)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto", several: bool = False) -> None:
    p.add_argument("--dtype", default=default,
                   help=("comma-separated image-tower precisions from " if several else "image-tower precision: ")
                   + ("" if several else "auto (bf16 on a GPU with native bf16, else fp32), ") + "fp32, bf16, fp16 (GPU); the "
                   "perturbation, its steps and the logits stay fp32 (default: %(default)s)")


def add_labels_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--labels", default=None, help=f"comma-separated class names (default: {default})")
    p.add_argument("--labels-file", default=None, metavar="FILE",
                   help="class names, one per line (names may contain commas; # starts a comment) "
                        "(default: use --labels)")


def add_templates_arg(p: argparse.ArgumentParser, default: str, nargs: str | None = None) -> None:
    p.add_argument("--templates", default=None, nargs=nargs, metavar="TEMPLATES",
                   help=f"'|'-separated prompt templates, each with one {{}} (default: {default})")


# ----------------------------------------------------------------------------------------------------------
# Checking and applying arguments
# ----------------------------------------------------------------------------------------------------------
def apply_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads) when given; returns the thread count in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_device_arg(device: str) -> None:
    try:
        check_device(device)
    except SccError as err:
        raise SccError(f"--device {device}: {err}") from None


def check_output(path: str | None, flag: str = "--json", inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written: `-` (stdout) and None pass."""
    from ..images import IMAGE_SUFFIXES

    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise SccError(f"{flag} {path} is a directory: give a file name, e.g. {flag} {p / 'report.json'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise SccError(f"cannot write {flag} {path}: the folder {parent} does not exist; create it first "
                       f"(mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise SccError(f"cannot write {flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SccError(f"cannot write {flag} {path}: permission denied; choose a writable folder")
    resolved = p.resolve()
    if any(Path(i).resolve() == resolved for i in inputs):
        raise SccError(f"{flag} {path} is also an input file: refusing to overwrite it")
    if p.exists() and p.suffix.lower() in IMAGE_SUFFIXES:
        raise SccError(f"{flag} {path} is an existing image: refusing to overwrite it with a report "
                       f"(did an image name follow a bare {flag}? write {flag} report.json or {flag} -)")


def check_folder(path: str, flag: str = "--out", parents: bool = False) -> Path:
    """Create an output folder (with `parents`, any missing parents too; else the parent must exist) and prove it
    is writable now, before long work."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SccError(f"{flag} {path} is a file: give a folder")
    if not folder.exists() and not parents and not folder.parent.is_dir():
        raise SccError(f"{flag} {path}: the folder {folder.parent} does not exist; create it first")
    try:
        folder.mkdir(parents=parents, exist_ok=True)
        probe = folder / f".scc-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SccError(f"{flag} {path}: not a writable folder ({err.strerror or err})") from None
    return folder


def write_json(report: dict, path: str | None) -> None:
    """The report to `path` (`-`: stdout). The table has been printed before, so a failure loses nothing."""
    if path is None:
        return
    text = json.dumps(report, indent=2)
    if path == "-":
        print(text)
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as err:
        raise SccError(f"could not write --json {path}: {err.strerror or err}") from None


def parse_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """--labels a,b,c or --labels-file FILE (one name a line, so names may contain commas), checked."""
    if labels is not None and labels_file is not None:
        raise SccError("give either --labels or --labels-file, not both")
    if labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise SccError(f"--labels-file {labels_file}: no such file")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SccError(f"--labels-file {labels_file}: cannot read it as UTF-8 text ({err})") from None
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return check_labels(names, "--labels-file")
    if labels is None:
        return None
    return check_labels([t.strip() for t in labels.split(",")], "--labels")


def parse_templates(text: str | Sequence[str] | None) -> list[str] | None:
    """'|'-separated templates (a list of such strings too, for `scc export`'s older space-separated form)."""
    if text is None:
        return None
    parts = [text] if isinstance(text, str) else list(text)
    templates = [t for part in parts for t in part.split("|")]
    if not any(t.strip() for t in templates):
        raise SccError("--templates is empty: give '|'-separated templates with one {}, e.g. 'a photo of a {}.'")
    return check_templates(templates)


def status(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr (`scc: ...`), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"scc: {message}", file=sys.stderr, flush=True)
