"""The ``qatcore`` command line: ``plugins``, ``plan`` and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import qatcore
from qatcore._api import get_qconfig
from qatcore._config import MAX_BITS, MIN_BITS
from qatcore._plan import plan
from qatcore._plugins import (
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    ENV_STRICT,
    PluginError,
    _env_flag,
    plugin_manager,
)
from qatcore._protocol import SwapError

if TYPE_CHECKING:
    from qatcore import _demo
from qatcore._registry import describe_key

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

MAX_SEED = 2**64 - 1
"""Largest seed torch.manual_seed accepts."""


class CommandError(Exception):
    """A command failed; the message is printed as one line and ``exit_code`` is returned."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _usage_error(message: str) -> CommandError:
    return CommandError(message, EXIT_USAGE)


# -- qatcore plugins -------------------------------------------------------


def _describe_registration(table: str, key: object) -> str:
    if isinstance(key, str):
        return key
    if table in ("kernels", "learnable_kernels", "observing_kernels") and isinstance(key, tuple):
        name, device_type = key
        return f"{name} ({device_type})"
    return describe_key(key)


def _plugin_rows() -> list[tuple[str, str, str, list[str]]]:
    rows = []
    for info in plugin_manager().plugins():
        registered = [
            f"{table}: " + ", ".join(_describe_registration(table, key) for key in keys)
            for table, keys in info.registrations.items()
        ]
        lines = (registered or ["nothing"]) + [f"note: {note}" for note in info.notes]
        rows.append((info.name, info.distribution or "(in-process)", info.version or "-", lines))
    return rows


def _format_plugin_table(rows: list[tuple[str, str, str, list[str]]]) -> list[str]:
    header = ("plugin", "distribution", "version")
    widths = [max(len(header[column]), *(len(row[column]) for row in rows)) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)) + "  registered"]
    lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 10)
    indent = " " * (sum(widths) + 2 * len(widths))
    for name, distribution, version, registered in rows:
        cells = (name, distribution, version)
        first = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths))
        lines.append(f"{first}  {registered[0]}")
        lines.extend(indent + line for line in registered[1:])
    return lines


def _run_plugins(args: argparse.Namespace) -> int:
    manager = plugin_manager()
    try:
        rows = _plugin_rows()
        failures = manager.failures()
        skipped = manager.skipped()
    except PluginError as error:
        raise CommandError(f"{error} ({ENV_STRICT} is set)") from None

    if rows:
        _print_lines(_format_plugin_table(rows))
    else:
        print("no plugins are loaded")
    if _env_flag(ENV_DISABLE_AUTOLOAD):
        print(f"\n{ENV_DISABLE_AUTOLOAD} is set, so installed entry points are not loaded")
    blocked = manager.blocked()
    if blocked:
        print(f"\nblocked by {ENV_BLOCK}: {', '.join(blocked)}")
    if skipped:
        print("\nskipped, because a requirement is missing:")
        _print_lines(f"  {skip.describe()}" for skip in skipped)
    if failures:
        print("\nfailed to load:")
        _print_lines(f"  {failure.describe()}" for failure in failures)
        return EXIT_FAILURE
    return EXIT_OK


# -- qatcore plan ----------------------------------------------------------


def _load_factory(target: str) -> tuple[str, Callable[[], object]]:
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise _usage_error(
            f"invalid model factory {target!r}: expected MODULE:FACTORY, "
            "for example mymodels:build_model"
        )

    # A console script does not put the working directory on sys.path, but
    # `qatcore plan mymodels:build` is meant to find ./mymodels.py.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name or module_name.startswith(f"{error.name}."):
            raise _usage_error(
                f"cannot import module {module_name!r}: no module of that name was found; "
                "check the spelling, and run from the folder that contains it or add that "
                "folder to PYTHONPATH"
            ) from None
        raise _usage_error(
            f"cannot import module {module_name!r}: {error}; install the missing package"
        ) from None
    except Exception as error:
        raise _usage_error(
            f"cannot import module {module_name!r}: {type(error).__name__}: {error}"
        ) from None

    factory = getattr(module, attribute, None)
    if factory is None:
        names = [name for name in vars(module) if not name.startswith("_")]
        close = difflib.get_close_matches(attribute, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise _usage_error(f"module {module_name!r} has no attribute {attribute!r}{hint}")
    if not callable(factory):
        raise _usage_error(
            f"{target} is not callable (type {type(factory).__name__}); point MODULE:FACTORY "
            "at a function or class that builds the model"
        )
    return target, factory


def _build_model(target: str, factory: Callable[[], object]) -> nn.Module:
    try:
        model = factory()
    except Exception as error:
        hint = "; the factory is called without arguments" if isinstance(error, TypeError) else ""
        raise CommandError(
            f"calling {target}() failed: {type(error).__name__}: {error}{hint}"
        ) from None
    if not isinstance(model, nn.Module):
        raise _usage_error(
            f"{target}() returned an object of type {type(model).__name__}, expected a "
            "torch.nn.Module; "
            "point MODULE:FACTORY at a function or class that builds the model"
        )
    return model


def _lookup_qconfig(name: str) -> qatcore.QConfig:
    try:
        return get_qconfig(name)
    except KeyError as error:
        detail = error.args[0] if error.args else ""
        if "install the" not in detail:
            detail += "; pass one of the registered names to --qconfig"
        raise _usage_error(f"unknown qconfig {name!r}: {detail}") from None


def _lookup_observer(name: str) -> None:
    observers = plugin_manager().registry.observers
    if name not in observers:
        raise _usage_error(f"unknown observer {name!r}: {observers.missing_message(name)}")


def _run_plan(args: argparse.Namespace) -> int:
    # Cheap checks first: the factory is called last because building a
    # model can take long.
    target, factory = _load_factory(args.model)
    qconfig = _lookup_qconfig(args.qconfig)
    model = _build_model(target, factory)
    try:
        decisions = plan(model, qconfig)
    except SwapError as error:
        raise CommandError(f"cannot plan {args.model}: {error}") from None
    print(decisions.table())
    print()
    print(decisions.summary())
    return EXIT_OK


# -- qatcore export --------------------------------------------------------

DEMO_MODEL = "demo"
"""MODULE:FACTORY shortcut for the demo's CNN, whose input shape is (1, 1, 8, 8)."""


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes separated by commas such as 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"every size must be at least 1, got {text!r}")
    return shape


def _load_state_dict(path: Path) -> dict[str, object]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _usage_error(f"cannot read the state_dict: {path} does not exist") from None
    except Exception as error:  # torch.load raises many types for a bad file
        raise CommandError(
            f"cannot read the state_dict {path}: {type(error).__name__}: {error}; pass a file "
            "written by torch.save(qat_model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict):
        raise CommandError(
            f"{path} contains a {type(state).__name__}, not a state_dict; save "
            "qat_model.state_dict() rather than the model"
        )
    return state


def _run_export(args: argparse.Namespace) -> int:
    from qatcore import _demo

    registry = plugin_manager().registry
    if args.format not in registry.exporters:
        missing = registry.exporters.missing_message(args.format)
        raise _usage_error(f"unknown export format {args.format!r}: {missing}")
    if args.model == DEMO_MODEL:
        target, factory = f"{DEMO_MODEL} (the demo's CNN)", _demo.build_model
        shape = args.input_shape or (1, 1, 8, 8)
    else:
        target, factory = _load_factory(args.model)
        if args.input_shape is None:
            raise _usage_error(
                "--input-shape is required for a model other than the demo's: the exporter "
                "traces one forward call on an input of that shape"
            )
        shape = args.input_shape
    qconfig = _lookup_qconfig(args.qconfig)
    state = _load_state_dict(args.state_dict)
    model = _build_model(target, factory)
    try:
        qat_model = qatcore.swap_modules(model, qconfig)
    except SwapError as error:
        raise CommandError(f"cannot swap {target}: {error}") from None
    mismatch = f"{args.state_dict} does not fit {target} swapped with the {args.qconfig} preset"
    fix = "export with the --qconfig and model it was trained with"
    try:
        problems = qat_model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of the wrong shape
        details = [line.strip() for line in str(error).splitlines()[1:4]]
        raise CommandError(f"{mismatch} ({'; '.join(details)}); {fix}") from None
    missing, unexpected = problems.missing_keys, problems.unexpected_keys
    if missing and all(key.endswith("._extra_state") for key in missing) and not unexpected:
        raise CommandError(
            f"{args.state_dict} does not record the codes its qparams were trained for (such "
            "as a state_dict saved before qatcore recorded them), so the export cannot check "
            f"that they are the {args.qconfig} preset's; load it into the model swapped with "
            "the preset it was trained with, using load_state_dict(state, strict=False), and "
            "save that model's state_dict again"
        )
    if unexpected and all(key.startswith("module.") for key in unexpected):
        fix = (
            "its keys start with 'module.', as DistributedDataParallel saves them; strip "
            "the prefix with torch.nn.modules.utils.consume_prefix_in_state_dict_if_present("
            "state, 'module.') and save it again"
        )
    if missing or unexpected:
        parts = [
            f"{label}: {', '.join(keys[:5])}{' and more' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing", problems.missing_keys),
                ("unexpected", problems.unexpected_keys),
            )
            if keys
        ]
        raise CommandError(f"{mismatch} ({'; '.join(parts)}); {fix}")
    qat_model.eval()
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    options = {} if args.opset is None else {"opset": args.opset}
    try:
        report = qatcore.export(qat_model, args.output, (example,), format=args.format, **options)
    except qatcore.DeployError as error:
        raise CommandError(f"cannot export {target}: {error}") from None
    except OSError as error:
        raise CommandError(f"cannot write {args.output}: {error}") from None
    print(f"exported {target} to {args.output} ({args.format})")
    if report is not None:
        print(report)
    return EXIT_OK


# -- qatcore demo ----------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from qatcore import _demo

    if args.learnable and args.qat_epochs < 2:
        raise _usage_error(
            f"--learnable needs --qat-epochs 2 or more, got {args.qat_epochs}: the first QAT "
            "epoch initialises the scales from the observers, the later ones train them"
        )
    _lookup_qconfig(args.qconfig)
    if args.observer is not None:
        _lookup_observer(args.observer)
    changes = [
        f"{args.observer} observer" if args.observer else "",
        f"{args.bits} bits" if args.bits else "",
        "learnable scales" if args.learnable else "",
    ]
    described = ", ".join(change for change in changes if change)
    progress = None if args.no_progress else _demo.ProgressBar(sys.stderr)
    print(
        "Training a small CNN on scikit-learn's digits images: "
        f"seed {args.seed}, {args.epochs} float and {args.qat_epochs} QAT epochs, "
        f"{args.qconfig} preset" + (f" with {described}" if described else "")
    )
    sys.stdout.flush()
    try:
        result = _demo.run_demo(
            epochs=args.epochs,
            qat_epochs=args.qat_epochs,
            seed=args.seed,
            qconfig_name=args.qconfig,
            observer=args.observer,
            bits=args.bits,
            learnable=args.learnable,
            samples=args.samples,
            output=args.output,
            progress=progress,
        )
    except (_demo.MissingDependencyError, SwapError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"cannot save the state_dict in {args.output}: {error}") from None

    change = 100 * (result.qat_accuracy - result.float_accuracy)
    print()
    print(f"Swap plan ({result.qconfig_name}):")
    print(result.plan.table())
    print(result.plan.summary())
    print()
    print(f"Test accuracy on {result.test_size} images ({result.train_size} for training):")
    print(f"  float: {100 * result.float_accuracy:6.2f}%")
    print(f"  QAT:   {100 * result.qat_accuracy:6.2f}%  ({change:+.2f} points, eval mode)")
    for deployed in result.deployed:
        _print_lines(_deployed_lines(deployed))
    print(f"Trained and evaluated in {result.seconds:.1f} s")
    if result.state_dict_path is not None:
        print(f"QAT state_dict saved to {result.state_dict_path}")
    return EXIT_OK


def _deployed_lines(deployed: _demo.DeployedAccuracy) -> list[str]:
    label = f"  int8, {deployed.target}:"
    if deployed.accuracy is None:
        return [f"{label} not measured: {deployed.reason}"]
    lines = [
        f"{label} {100 * deployed.accuracy:6.2f}%  (same label as QAT on "
        f"{100 * deployed.agreement:.2f}% of the images; logits within "
        f"{deployed.max_steps:.2f} output steps of QAT)"
    ]
    if deployed.path is not None:
        lines.append(f"    exported to {deployed.path}")
    return lines


# -- parser and entry point ------------------------------------------------


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value

    return parse


def _folder_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    return Path(text)


def _build_parser() -> argparse.ArgumentParser:
    from qatcore import _demo

    parser = argparse.ArgumentParser(
        prog="qatcore",
        description="Quantization-aware training for PyTorch: inspect plugins, plan a swap, "
        "export a trained model, run the demo.",
    )
    parser.add_argument("--version", action="version", version=f"qatcore {qatcore.__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debug messages, with tracebacks, on stderr",
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )

    plugins = commands.add_parser(
        "plugins",
        help="list the installed plugins and what each registered",
        description="List the loaded plugins with their distribution, version and "
        "registrations, then the blocked ones, the ones skipped because a requirement is "
        "missing (such as a CUDA device), and the ones that failed to load (exit code 1).",
    )
    plugins.set_defaults(run=_run_plugins)

    plan_parser = commands.add_parser(
        "plan",
        help="show what swap_modules would do to a model",
        description="Import MODULE, call FACTORY() to build a model, and print its swap plan. "
        "The working directory is searched for MODULE first.",
    )
    plan_parser.add_argument(
        "model", metavar="MODULE:FACTORY", help="a function or class that builds the model"
    )
    plan_parser.add_argument(
        "--qconfig", default="x86", metavar="NAME", help="preset QConfig (default: x86)"
    )
    plan_parser.set_defaults(run=_run_plan)

    export_parser = commands.add_parser(
        "export",
        help="export a trained QAT model, such as to ONNX with QDQ pairs",
        description="Build the model with MODULE:FACTORY (or 'demo' for the demo's CNN), swap "
        "it with the preset, load the QAT state_dict, and export it. The exporter checks the "
        "file and prints how far its output is from the QAT model's on a random input.",
    )
    export_parser.add_argument(
        "model",
        metavar="MODULE:FACTORY",
        help="a function or class that builds the float model, or 'demo'",
    )
    export_parser.add_argument(
        "--state-dict",
        required=True,
        type=Path,
        metavar="FILE",
        help="the QAT model's state_dict, as torch.save wrote it (the demo's --output writes one)",
    )
    export_parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="FILE", help="the file to write"
    )
    export_parser.add_argument(
        "--input-shape",
        type=_input_shape,
        metavar="SIZES",
        help="shape of the model's input, such as 1,3,224,224 (default for demo: 1,1,8,8)",
    )
    export_parser.add_argument(
        "--qconfig",
        default="x86",
        metavar="NAME",
        help="preset QConfig the model was trained with (default: x86)",
    )
    export_parser.add_argument(
        "--format", default="onnx", metavar="NAME", help="export format (default: onnx)"
    )
    export_parser.add_argument(
        "--opset", type=_at_least(1), metavar="N", help="ONNX opset (default: the exporter's)"
    )
    export_parser.set_defaults(run=_run_export)

    demo = commands.add_parser(
        "demo",
        help="train a CNN on digits, swap it to QAT, and compare accuracies",
        description="Train a small CNN on scikit-learn's digits images, swap it to QAT with a "
        "preset, fine-tune it, and print float and QAT test accuracy and the swap plan.",
    )
    demo.add_argument(
        "--epochs",
        type=_at_least(1),
        default=_demo.DEFAULT_EPOCHS,
        help=f"float training epochs (default: {_demo.DEFAULT_EPOCHS})",
    )
    demo.add_argument(
        "--qat-epochs",
        type=_at_least(1),
        default=_demo.DEFAULT_QAT_EPOCHS,
        help=f"QAT fine-tuning epochs (default: {_demo.DEFAULT_QAT_EPOCHS})",
    )
    demo.add_argument(
        "--seed",
        type=_at_least(0, MAX_SEED),
        default=0,
        help=f"seed of the initial weights and batch order, 0 to {MAX_SEED} (default: 0)",
    )
    demo.add_argument(
        "--qconfig", default="x86", metavar="NAME", help="preset QConfig (default: x86)"
    )
    demo.add_argument(
        "--observer",
        metavar="NAME",
        help="observer of the weights and outputs instead of the preset's, such as histogram",
    )
    demo.add_argument(
        "--bits",
        type=_at_least(MIN_BITS, MAX_BITS),
        metavar="N",
        help=f"bit width of the weights and outputs instead of the preset's, {MIN_BITS} to "
        f"{MAX_BITS}",
    )
    demo.add_argument(
        "--learnable",
        action="store_true",
        help="train the scales and affine zero points (LSQ, LSQ+) instead of observing them",
    )
    demo.add_argument(
        "--output",
        type=_folder_path,
        metavar="DIR",
        help=f"save the QAT state_dict as DIR/{_demo.STATE_DICT_NAME} and the ONNX export "
        f"as DIR/{_demo.ONNX_NAME}, creating DIR",
    )
    demo.add_argument(
        "--samples",
        type=_at_least(_demo.MIN_SAMPLES, _demo.DIGITS_SAMPLES),
        metavar="N",
        help=f"use N of the {_demo.DIGITS_SAMPLES} images, for a shorter run (default: all)",
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="do not draw progress bars on stderr"
    )
    demo.set_defaults(run=_run_demo)
    return parser


class _OneLineFormatter(logging.Formatter):
    """Format a record without its traceback, for users who did not ask for ``--verbose``."""

    def format(self, record: logging.LogRecord) -> str:
        brief = logging.makeLogRecord(record.__dict__)
        brief.exc_info = None
        brief.exc_text = None
        return super().format(brief)


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("qatcore")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("qatcore: %(levelname)s: %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLineFormatter("qatcore: %(levelname)s: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qatcore`` command line and return its exit code.

    Exit codes: 0 on success, 1 when a command fails (a plugin failed to
    load, the model factory raised, the demo cannot run), 2 for invalid
    arguments.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        # --help and --version exit with 0, invalid arguments with 2.
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE

    with _logging_to_stderr(args.verbose):
        try:
            return args.run(args)
        except CommandError as error:
            print(f"qatcore {args.command}: error: {error}", file=sys.stderr)
            return error.exit_code
        except PluginError as error:
            # Strict mode (QATCORE_STRICT_PLUGINS=1) turns a broken plugin into this.
            print(f"qatcore {args.command}: error: {error}", file=sys.stderr)
            return EXIT_FAILURE
