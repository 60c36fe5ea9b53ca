"""Time a QAT training step and the fake-quant kernel on the CPU, side by side in one process.

Part 1 times one SGD training step (forward, backward, optimizer step) of a
small ResNet-style conv net in four variants built from the same weights.
They are float, qatcore QAT with the ``x86`` preset, torch.ao eager QAT with
``get_default_qat_qconfig("x86")`` on the whole model, and torch.ao with
that qconfig on the convolutions only, which are the modules qatcore
quantizes. Rounds interleave the variants in a rotating order, so that a
slow spell of the machine hits every variant alike.

Part 2 times the fake-quant kernels alone against ``x.clone()`` of the same
tensor: per-tensor on an activation-sized tensor and per-channel on a
weight-sized one, forward only and forward plus backward.

Run from the repository root::

    python benchmarks/bench_training_step.py --threads 2 --steps 30

This is a measurement, not a test: it asserts nothing and its numbers
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

import qatcore

# -- the model ------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a ReLU between them and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-sized ResNet: a 3x3 stem and three stages of two basic blocks each."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(BasicBlock(in_channels, width, stride))
            stages.append(BasicBlock(width, width, 1))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build_variants(seed: int) -> dict[str, nn.Module]:
    """Return the float model and its QAT versions, all starting from the same weights."""
    torch.manual_seed(seed)
    base = SmallResNet().train()

    # Convs only and no fusion, so that qatcore quantizes the same tensors as
    # the "torch.ao convs" variant: BN folding would add a float conv pass.
    qatcore_model = qatcore.swap_modules(
        copy.deepcopy(base), {nn.Conv2d: qatcore.get_qconfig("x86")}, fuse=False
    )

    ao_model = copy.deepcopy(base)
    ao_model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(ao_model, inplace=True)

    ao_convs = copy.deepcopy(base)
    for module in ao_convs.modules():
        if isinstance(module, nn.Conv2d):
            module.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(ao_convs, inplace=True)

    # BN folded into the convs by both libraries, on the groups qatcore's plan
    # finds: qatcore's numerically stable fold runs a second, float conv per
    # group in training, where torch.ao's default fold divides by gamma.
    x86 = qatcore.get_qconfig("x86")
    qatcore_fused = qatcore.swap_modules(copy.deepcopy(base), x86)
    groups = [list(entry.members) for entry in qatcore.plan(base, x86) if entry.action == "fuse"]
    ao_fused = tq.fuse_modules_qat(copy.deepcopy(base).train(), groups)
    ao_fused.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(ao_fused, inplace=True)
    ao_stable = copy.deepcopy(ao_fused)
    for module in ao_stable.modules():
        if hasattr(module, "_enable_slow_path_for_better_numerical_stability"):
            module._enable_slow_path_for_better_numerical_stability = True

    return {
        "float": base,
        "qatcore": qatcore_model.train(),
        "torch.ao": ao_model.train(),
        "torch.ao convs": ao_convs.train(),
        "qatcore BN folded": qatcore_fused.train(),
        "torch.ao BN folded": ao_fused.train(),
        "torch.ao BN folded, stable": ao_stable.train(),
    }


def count_fake_quants(model: nn.Module) -> int:
    """Count the fake-quant modules of either library in ``model``."""
    kinds = (qatcore.FakeQuantize, tq.FakeQuantizeBase)
    return sum(isinstance(module, kinds) for module in model.modules())


# -- timing -----------------------------------------------------------------------------


def time_interleaved(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Time every case once per round, in an order that rotates each round; return seconds."""
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                times[name].append(elapsed)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def print_table(times: dict[str, list[float]], extra: dict[str, str] | None = None) -> None:
    extra = extra or {}
    for name, samples in times.items():
        low, high = min(samples) * 1e3, max(samples) * 1e3
        line = f"  {name:<34} {median_ms(samples):9.2f} ms   (min {low:.2f}, max {high:.2f})"
        if name in extra:
            line += f"   {extra[name]}"
        print(line)


def print_ratios(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> None:
    for numerator, denominator in pairs:
        ratio = median_ms(times[numerator]) / median_ms(times[denominator])
        print(f"  {numerator} / {denominator}: {ratio:.2f}")


# -- part 1: the training step ------------------------------------------------------------


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()


def bench_training_step(args: argparse.Namespace) -> None:
    variants = build_variants(seed=0)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.batch, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 10, (args.batch,), generator=generator)

    cases = {}
    for name, model in variants.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cases[name] = lambda m=model, o=optimizer: training_step(m, o, inputs, targets)

    print(
        f"\n1. Training step: SmallResNet, batch {args.batch}x3x32x32, SGD, "
        f"median of {args.steps} interleaved rounds after {args.warmup} warm-up rounds"
    )
    times = time_interleaved(cases, args.steps, args.warmup)
    counts = {name: f"{count_fake_quants(model)} fake quants" for name, model in variants.items()}
    print_table(times, counts)
    print_ratios(
        times,
        [
            ("qatcore", "float"),
            ("torch.ao", "float"),
            ("torch.ao convs", "float"),
            ("qatcore", "torch.ao"),
            ("qatcore", "torch.ao convs"),
            ("qatcore BN folded", "float"),
            ("torch.ao BN folded", "float"),
            ("qatcore BN folded", "torch.ao BN folded"),
            ("qatcore BN folded", "torch.ao BN folded, stable"),
        ],
    )

    if args.profile:
        profile_steps(cases, ["qatcore", "torch.ao convs"], args.profile_rows)


def profile_steps(cases: dict[str, Callable[[], object]], names: list[str], rows: int) -> None:
    """Print torch.profiler's top ops by self CPU time for a few steps of each named case."""
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                cases[name]()
        print(f"\n  profile of 5 steps, {name}, sorted by self CPU time:")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print("\n".join("    " + line for line in table.splitlines()))


# -- part 2: the kernels ------------------------------------------------------------------


def kernel_cases(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
) -> dict[str, Callable[[], object]]:
    """Return the clone, and forward and forward+backward calls of every kernel, on ``x``."""
    kernels: dict[str, Callable[..., torch.Tensor]] = {
        "reference": qatcore.fake_quantize_reference,
    }
    registered = qatcore.plugin_manager().registry.kernels.get(("default", "cpu"))
    if registered is not None:
        kernels["qatcore-cpu"] = registered

    leaf = x.detach().requires_grad_()
    grad_output = torch.randn_like(x)
    cases: dict[str, Callable[[], object]] = {"clone": x.clone}
    for name, kernel in kernels.items():
        cases[f"{name} forward"] = lambda k=kernel: k(leaf, scale, zero_point, *quant_range, axis)
        cases[f"{name} forward+backward"] = lambda k=kernel: k(
            leaf, scale, zero_point, *quant_range, axis
        ).backward(grad_output)
    return cases


def bench_kernels(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(2)
    activation = torch.randn(64, 64, 56, 56, generator=generator)
    weight = torch.randn(512, 512, 3, 3, generator=generator) * 0.05
    weight_scale = weight.abs().amax(dim=(1, 2, 3)) / 127.5
    setups = {
        "per-tensor, activation 64x64x56x56 float32": (
            activation,
            torch.tensor(0.02),
            torch.tensor(128, dtype=torch.int32),
            (0, 255),
            None,
        ),
        "per-channel axis 0, weight 512x512x3x3 float32": (
            weight,
            weight_scale,
            torch.zeros(512, dtype=torch.int32),
            (-128, 127),
            0,
        ),
    }
    print(f"\n2. Fake-quant kernel alone, median of {args.kernel_rounds} interleaved rounds")
    for title, (x, scale, zero_point, quant_range, axis) in setups.items():
        print(f"  {title}:")
        cases = kernel_cases(x, scale, zero_point, quant_range, axis)
        times = time_interleaved(cases, args.kernel_rounds, args.warmup)
        print_table(times)
        pairs = [(name, "clone") for name in cases if name != "clone"]
        if "qatcore-cpu forward" in cases:
            pairs += [
                ("qatcore-cpu forward", "reference forward"),
                ("qatcore-cpu forward+backward", "reference forward+backward"),
            ]
        print_ratios(times, pairs)


# -- entry point --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="images per training step")
    parser.add_argument("--kernel-rounds", type=int, default=15, help="timed calls per kernel case")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch.profiler tables of the QAT steps"
    )
    parser.add_argument("--profile-rows", type=int, default=25, help="rows of each profiler table")
    parser.add_argument("--skip-kernels", action="store_true", help="time the training step only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # torch.ao's eager QAT warns about reduce_range and deprecated APIs; the
    # numbers are the point here.
    warnings.filterwarnings("ignore")

    kernel = qatcore.plugin_manager().registry.kernels.get(("default", "cpu"))
    kernel_name = f"{kernel.__module__}.{kernel.__name__}" if kernel else "none (reference)"
    print(
        f"torch {torch.__version__}, qatcore {qatcore.__version__}, "
        f"{torch.get_num_threads()} threads, CPU: {cpu_model()}"
    )
    print(f"qatcore CPU kernel: {kernel_name}")

    bench_training_step(args)
    if not args.skip_kernels:
        bench_kernels(args)


if __name__ == "__main__":
    main()
