"""Time int8 inference of a converted QAT model against float and QAT inference.

For each net of ``_models.NETS`` the float model is swapped with the x86
preset, trained for a few steps on random data so that observers and BN
statistics move, and put in eval mode. Then one forward pass on a batch is
timed for:

- ``float``: the float model in eval mode;
- ``QAT eval``: the QAT model in eval mode, fake quantization on;
- ``int8, x86 engine``: ``qatcore.convert(qat, "x86")``;
- ``int8, qnnpack engine``: ``qatcore.convert(qat, "arm")``, where the
  ``qatcore-arm`` plugin is installed (qnnpack also runs on x86 CPUs);
- ``int8, ONNX Runtime``: the ``qatcore.export`` file run in an ONNX
  Runtime session with every graph optimization, where ``qatcore-onnx`` is
  installed. ONNX Runtime uses ``--threads`` intra-op threads.

The largest difference of each int8 model's output to the QAT model's, in
steps of the output scale, is printed with its time. Each int8 layer of
``qatcore.convert`` quantizes its input and dequantizes its output, so that
float operations between layers (additions, pooling) stay float. An engine
that runs a whole quantized graph, as ONNX Runtime does, saves that time.

Run from the repository root after the Quick start install::

    python benchmarks/bench_int8.py

This is a measurement, not a test: it asserts nothing, and its numbers
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _harness import (
    add_thread_option,
    format_ms,
    format_ratio,
    markdown_table,
    median,
    print_section,
    start,
    time_interleaved,
)
from _models import NETS, Net, make_batch
from torch import nn

import qatcore

TRAINING_STEPS = 5


def trained_qat_model(net: Net, batch: int) -> tuple[nn.Module, nn.Module]:
    """Return the float model and its x86 QAT model after a few SGD steps, both in eval mode."""
    torch.manual_seed(0)
    model = net.build()
    qat = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for step in range(TRAINING_STEPS):
        inputs, targets = make_batch(net, batch, seed=step)
        loss = nn.functional.cross_entropy(qat(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), qat.eval()


def onnx_session(qat: nn.Module, example: torch.Tensor, folder: Path, threads: int) -> object:
    import onnxruntime

    path = folder / "model.onnx"
    qatcore.export(qat, path, (example,))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def variants(
    model: nn.Module, qat: nn.Module, example: torch.Tensor, folder: Path, threads: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """Return, by row name, a call that runs one forward pass and returns the output."""
    registry = qatcore.plugin_manager().registry
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "float": lambda: model(example),
        "QAT eval": lambda: qat(example),
    }
    for backend, engine in (("x86", "x86"), ("arm", "qnnpack")):
        if backend not in registry.converters:
            continue
        int8 = qatcore.convert(qat, backend)

        def run(int8: nn.Module = int8, engine: str = engine) -> torch.Tensor:
            torch.backends.quantized.engine = engine
            return int8(example)

        cases[f"int8, {engine} engine"] = run
    if "onnx" in registry.exporters:
        session = onnx_session(qat, example, folder, threads)
        name = session.get_inputs()[0].name  # type: ignore[attr-defined]
        array = example.numpy()
        cases["int8, ONNX Runtime"] = lambda: torch.from_numpy(
            session.run(None, {name: array})[0]  # type: ignore[attr-defined]
        )
    return cases


def output_step(qat: nn.Module) -> float:
    return float(qatcore.quantized_layers(qat)[-1].output.scale)


def run_net(name: str, net: Net, args: argparse.Namespace) -> None:
    model, qat = trained_qat_model(net, args.batch)
    example, _ = make_batch(net, args.batch, seed=100)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        cases = variants(model, qat, example, Path(folder), args.threads)
        expected = qat(example)
        steps = {
            row: float((call() - expected).abs().max()) / output_step(qat)
            for row, call in cases.items()
            if row.startswith("int8")
        }
        timed, _ = time_interleaved(cases, args.rounds, args.warmup)

    float_time = median(timed["float"])
    rows = []
    for row, samples in timed.items():
        seconds = median(samples)
        difference = f"{steps[row]:.2f}" if row in steps else ""
        rows.append([row, format_ms(seconds), format_ratio(seconds, float_time), difference])
    header = ["variant", "ms", "vs float", "max difference to QAT, output steps"]
    note = (
        f"{net.description}; batch {args.batch}. Median of {args.rounds} interleaved rounds "
        f"after {args.warmup} untimed ones."
    )
    print_section(f"`{name}`", markdown_table(header, rows), note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets",
        nargs="+",
        choices=sorted(NETS),
        default=["resnet", "depthwise"],
        help="nets to time (default: resnet depthwise)",
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default: 3)")
    add_thread_option(parser)
    args = parser.parse_args()
    start(args)
    engine = torch.backends.quantized.engine
    try:
        for name in args.nets:
            run_net(name, NETS[name], args)
    finally:
        torch.backends.quantized.engine = engine


if __name__ == "__main__":
    main()
