"""Every QAT conv and linear module, swept over the options of its float layer.

Each case builds ``nn.Sequential(layer[, BatchNorm][, ReLU])`` and swaps it
with the ``x86`` preset through ``qatcore.swap_modules``. Four tests check
each case:

- The plan fuses the whole Sequential into the expected QAT type.
- With fake quantization off, the QAT model computes what the float model
  computes, in training mode (BatchNorm running statistics included) and in
  eval mode.
- One SGD step with fake quantization on keeps every output and gradient
  finite, and the weight gets one scale per output channel.
- ``qatcore.to_float`` returns plain ``torch.nn`` modules whose eval output
  equals the QAT model's with fake quantization off.

The axes are dims (1d, 2d, 3d), padding ("zeros", "reflect", "replicate"
and "circular" padding modes with padding 1, and the strings "same" and
"valid"), groups (1, 2, and depthwise: groups == in_channels), bias (on,
off) and dtype (float32, float64). Transposed convs take padding mode
"zeros" only, as torch allows, with stride 2 and output padding 1. Linear
layers have only bias and dtype. Per family and module kind:

- conv, plain, ReLU-fused and BN-folded: dims x padding are crossed fully.
  Groups, bias and dtype are covered pairwise.
- conv, BN-ReLU: dims x padding x groups are crossed fully. Bias and dtype
  are covered pairwise.
- transposed conv, plain, ReLU-fused and BN-folded: dims x groups are
  crossed fully. Bias and dtype are covered pairwise.
- transposed conv, BN-ReLU: all axes are crossed fully.
- linear, all four kinds: bias x dtype are crossed fully.

Covered pairwise means that every pair of values of any two axes, the fully
crossed ones included, occurs in at least one case. The sweep has about a
fifth of the cases of the full cross product of every axis.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

IN_CHANNELS = 4
# Twice the input channels, so that grouped and depthwise layers have two
# output channels per group and a channel-order mistake shows.
OUT_CHANNELS = 8
SPATIAL = 5
BATCH = 3
KERNEL = 3

# One output channel with gamma = 0, which folds to a zero weight row, and a
# negative gamma, which flips the sign of the folded weight.
GAMMA = [0.0, 1.0, 0.5, 2.0, -1.5, 1.25, 0.75, 3.0]

# Largest error allowed, relative to the largest magnitude of the expected tensor.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

FUSIONS = ("plain", "relu", "bn", "bn_relu")
DIMS = (1, 2, 3)
CONV_PADDINGS = ("zeros", "reflect", "replicate", "circular", "same", "valid")
GROUPS = (1, 2, IN_CHANNELS)
BIASES = (True, False)
DTYPES = (torch.float32, torch.float64)

AXES: dict[str, dict[str, tuple[object, ...]]] = {
    "conv": {
        "dim": DIMS,
        "padding": CONV_PADDINGS,
        "groups": GROUPS,
        "bias": BIASES,
        "dtype": DTYPES,
    },
    "transposed": {"dim": DIMS, "groups": GROUPS, "bias": BIASES, "dtype": DTYPES},
    "linear": {"bias": BIASES, "dtype": DTYPES},
}
# Axes crossed fully for the plain, ReLU-fused and BN-folded types.
FULLY_CROSSED = {
    "conv": ("dim", "padding"),
    "transposed": ("dim", "groups"),
    "linear": ("bias", "dtype"),
}
# Axes crossed fully for the BN-ReLU types, which run every step of the others.
FULLY_CROSSED_BN_RELU = {
    "conv": ("dim", "padding", "groups"),
    "transposed": ("dim", "groups", "bias", "dtype"),
    "linear": ("bias", "dtype"),
}

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
QAT_TYPE_PREFIXES = {"conv": "Conv", "transposed": "ConvTranspose", "linear": "Linear"}
QAT_TYPE_SUFFIXES = {"plain": "", "relu": "ReLU", "bn": "Bn", "bn_relu": "BnReLU"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One combination of layer options, with ``dim`` 1 for a linear layer."""

    kind: str
    fusion: str
    dim: int = 1
    padding: str = "zeros"
    groups: int = 1
    bias: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        parts = [self.kind, self.fusion]
        if self.kind != "linear":
            parts += [f"{self.dim}d", self.padding]
            parts.append("depthwise" if self.groups == IN_CHANNELS else f"groups{self.groups}")
        parts.append("bias" if self.bias else "no-bias")
        parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)

    @property
    def qat_type_name(self) -> str:
        name = QAT_TYPE_PREFIXES[self.kind] + QAT_TYPE_SUFFIXES[self.fusion]
        if self.kind == "linear":
            return name + ("1d" if "bn" in self.fusion else "")
        return f"{name}{self.dim}d"


def _pairs(row: dict[str, object]) -> set[tuple[tuple[str, object], tuple[str, object]]]:
    return set(itertools.combinations(row.items(), 2))


def _covering_rows(
    full: dict[str, tuple[object, ...]], pairwise: dict[str, tuple[object, ...]]
) -> list[dict[str, object]]:
    """Return rows containing every combination of the ``full`` axes and every pair of values.

    Each combination of the ``full`` axes gets the values of the ``pairwise``
    axes that cover the most pairs not covered yet, first found first. Rows
    are then added greedily over all axes until every pair of values of any
    two axes occurs in some row, so the result covers them all by
    construction.
    """
    axes = {**full, **pairwise}
    uncovered: set[tuple[tuple[str, object], tuple[str, object]]] = set()
    for first, second in itertools.combinations(axes, 2):
        for values in itertools.product(axes[first], axes[second]):
            uncovered.add(((first, values[0]), (second, values[1])))

    def gain(row: dict[str, object]) -> int:
        return len(_pairs(row) & uncovered)

    rows = []
    options = [dict(zip(pairwise, values)) for values in itertools.product(*pairwise.values())]
    for values in itertools.product(*full.values()):
        base = dict(zip(full, values))
        row = max(({**base, **option} for option in options), key=gain)
        rows.append(row)
        uncovered -= _pairs(row)
    while uncovered:
        candidates = (dict(zip(axes, values)) for values in itertools.product(*axes.values()))
        row = max(candidates, key=gain)
        rows.append(row)
        uncovered -= _pairs(row)
    return rows


def _cases() -> Iterator[Case]:
    for kind, axes in AXES.items():
        for fusion in FUSIONS:
            crossed = (FULLY_CROSSED_BN_RELU if fusion == "bn_relu" else FULLY_CROSSED)[kind]
            full = {name: axes[name] for name in crossed}
            pairwise = {name: values for name, values in axes.items() if name not in crossed}
            for row in _covering_rows(full, pairwise):
                yield Case(kind=kind, fusion=fusion, **row)


CASES = [pytest.param(case, id=case.id) for case in _cases()]


def _layer(case: Case) -> nn.Module:
    if case.kind == "linear":
        return nn.Linear(IN_CHANNELS, OUT_CHANNELS, bias=case.bias)
    if case.kind == "transposed":
        return TRANSPOSED_TYPES[case.dim](
            IN_CHANNELS,
            OUT_CHANNELS,
            KERNEL,
            stride=2,
            padding=1,
            output_padding=1,
            groups=case.groups,
            bias=case.bias,
        )
    if case.padding in ("same", "valid"):
        padding, padding_mode = case.padding, "zeros"
    else:
        padding, padding_mode = 1, case.padding
    return CONV_TYPES[case.dim](
        IN_CHANNELS,
        OUT_CHANNELS,
        KERNEL,
        padding=padding,
        padding_mode=padding_mode,
        groups=case.groups,
        bias=case.bias,
    )


def _float_model(case: Case) -> nn.Sequential:
    torch.manual_seed(0)
    members = [_layer(case)]
    if "bn" in case.fusion:
        bn = BN_TYPES[case.dim](OUT_CHANNELS)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(GAMMA))
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
        members.append(bn)
    if "relu" in case.fusion:
        members.append(nn.ReLU())
    return nn.Sequential(*members).to(case.dtype)


def _input(case: Case, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, IN_CHANNELS) + (SPATIAL,) * (0 if case.kind == "linear" else case.dim)
    return torch.randn(shape, generator=generator, dtype=case.dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    tolerance = RELATIVE_TOLERANCE[expected.dtype] * expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"max error {error:.3g} exceeds {tolerance:.3g}"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, restoring the thread count afterwards.

    The tensors are so small that a second thread gains nothing, and while
    other processes keep the cores busy, waiting for it dominates. On a 2-core
    machine with torch 2.13.0 (CPU build), during a parallel test run, a case
    took up to 30 times as long on two threads as on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x86() -> qatcore.QConfig:
    return qatcore.get_qconfig("x86")


@pytest.mark.parametrize("case", CASES)
def test_plan_fuses_whole_sequential(case: Case, x86: qatcore.QConfig) -> None:
    model = _float_model(case)

    entries = list(qatcore.plan(model, x86))
    qat = qatcore.swap_modules(model, x86)

    assert len(entries) == 1
    first = entries[0]
    assert first.qat_type is not None
    assert first.qat_type.__name__ == case.qat_type_name
    if len(model) > 1:
        assert first.action == "fuse"
        assert first.members == tuple(str(index) for index in range(len(model)))
    else:
        assert first.action == "swap"
    assert type(qat[0]).__name__ == case.qat_type_name
    assert all(isinstance(member, qatcore.FusedAway) for member in qat[1:])


@pytest.mark.parametrize("case", CASES)
def test_fake_quant_off_matches_float(case: Case, x86: qatcore.QConfig) -> None:
    model = _float_model(case)
    qat = qatcore.swap_modules(model, x86)
    qatcore.enable_fake_quant(qat, False)
    model.train()
    qat.train()
    x = _input(case, seed=1)

    _assert_close(qat(x), model(x))
    if "bn" in case.fusion:
        _assert_close(qat[0].bn.running_mean, model[1].running_mean)
        _assert_close(qat[0].bn.running_var, model[1].running_var)
        assert int(qat[0].bn.num_batches_tracked) == int(model[1].num_batches_tracked)

    model.eval()
    qat.eval()
    x = _input(case, seed=2)
    _assert_close(qat(x), model(x))


@pytest.mark.parametrize("case", CASES)
def test_sgd_step_with_fake_quant(case: Case, x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(_float_model(case), x86).train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    x = _input(case, seed=3).requires_grad_()

    output = qat(x)
    output.square().mean().backward()
    optimizer.step()

    assert torch.isfinite(output).all()
    assert torch.isfinite(x.grad).all()
    for name, parameter in qat.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert torch.isfinite(parameter).all(), name
    assert qat[0].weight_fake_quant.scale.shape == (OUT_CHANNELS,)
    assert torch.isfinite(qat[0].weight_fake_quant.scale).all()
    assert (qat[0].weight_fake_quant.scale > 0).all()
    assert torch.isfinite(qat(_input(case, seed=4))).all()


@pytest.mark.parametrize("case", CASES)
def test_to_float_matches_qat_eval(case: Case, x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(_float_model(case), x86).train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    qat(_input(case, seed=5)).square().mean().backward()
    optimizer.step()
    qat.eval()
    qatcore.enable_fake_quant(qat, False)
    x = _input(case, seed=6)

    float_model = qatcore.to_float(qat)

    assert not float_model.training
    _assert_close(float_model(x), qat(x))
    for name, module in float_model.named_modules():
        assert type(module).__module__.startswith("torch.nn."), name
    # The folded BatchNorm leaves an nn.Identity in its slot.
    expected_types = [type(_layer(case))]
    if "bn" in case.fusion:
        expected_types.append(nn.Identity)
    if "relu" in case.fusion:
        expected_types.append(nn.ReLU)
    assert [type(module) for module in float_model] == expected_types
