"""QAT models in bfloat16 and float16: under CPU autocast, and cast with ``to`` or ``half``.

Observers and fake quantizers keep float32 scales and int32 zero points
whatever the model's dtype, and the fake-quant math runs in float32 before
the result is cast back to the tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import qatcore

qatcore_conv = pytest.importorskip("qatcore_conv")
qatcore_linear = pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

STEPS = 2


def _conv() -> tuple[nn.Module, type[nn.Module], tuple[int, ...]]:
    return nn.Sequential(nn.Conv2d(3, 4, 3)), qatcore_conv.Conv2d, (2, 3, 6, 6)


def _conv_bn_relu() -> tuple[nn.Module, type[nn.Module], tuple[int, ...]]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    return model, qatcore_conv.ConvBnReLU2d, (2, 3, 6, 6)


def _linear() -> tuple[nn.Module, type[nn.Module], tuple[int, ...]]:
    return nn.Sequential(nn.Linear(6, 5)), qatcore_linear.Linear, (4, 6)


MODELS: dict[str, Callable[[], tuple[nn.Module, type[nn.Module], tuple[int, ...]]]] = {
    "conv": _conv,
    "conv-bn-relu": _conv_bn_relu,
    "linear": _linear,
}

# How the model runs in low precision, and the dtype its fake quantizers then see.
MODES = {
    "autocast-bf16": torch.bfloat16,
    "to-bf16": torch.bfloat16,
    "half": torch.float16,
}


def _swapped(model_name: str, mode: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    float_model, qat_type, input_shape = MODELS[model_name]()
    model = qatcore.swap_modules(float_model, qatcore.get_qconfig("x86"))
    assert type(model[0]) is qat_type

    x = torch.randn(input_shape)
    if mode == "to-bf16":
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    elif mode == "half":
        model = model.half()
        x = x.half()
    return model, x.requires_grad_()


def _fake_quants(model: nn.Module) -> list[tuple[str, qatcore.FakeQuantize]]:
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, qatcore.FakeQuantize)
    ]
    # The one QAT module is the model's first layer, so it quantizes its input too.
    assert [name.rsplit(".", 1)[-1] for name, _ in found] == [
        "weight_fake_quant",
        "output_fake_quant",
        "input_fake_quant",
    ]
    return found


def _run_steps(
    model: nn.Module, x: torch.Tensor, mode: str
) -> tuple[torch.Tensor, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Run ``STEPS`` training steps; return the last output and every fake quantizer's calls."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            calls.setdefault(name, []).append((args[0].detach().clone(), output.detach().clone()))

        return record

    for name, fake_quant in _fake_quants(model):
        fake_quant.register_forward_hook(recorder(name))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(STEPS):
        optimizer.zero_grad()
        x.grad = None
        if mode == "autocast-bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(x)
        else:
            output = model(x)
        output.float().square().mean().backward()
        optimizer.step()
    return output, calls


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_forward_backward_finite(model_name: str, mode: str) -> None:
    model, x = _swapped(model_name, mode)

    output, _ = _run_steps(model, x, mode)

    assert torch.isfinite(output).all()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.dtype == parameter.dtype, name
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_keeps_float32_qparams(model_name: str, mode: str) -> None:
    model, x = _swapped(model_name, mode)

    _run_steps(model, x, mode)

    for name, fake_quant in _fake_quants(model):
        observer = fake_quant.observer
        assert fake_quant.scale.dtype == torch.float32, name
        assert fake_quant.zero_point.dtype == torch.int32, name
        assert observer.min_val.dtype == torch.float32, name
        assert observer.max_val.dtype == torch.float32, name
        assert observer.nonfinite_batches.dtype == torch.int64, name
        assert torch.isfinite(observer.min_val).all(), name
        assert torch.isfinite(observer.max_val).all(), name

        scale, zero_point = observer.calculate_qparams()
        assert scale.dtype == torch.float32, name
        assert zero_point.dtype == torch.int32, name
        assert torch.equal(fake_quant.scale, scale), name
        assert torch.equal(fake_quant.zero_point, zero_point), name


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_matches_float32_reference(model_name: str, mode: str) -> None:
    model, x = _swapped(model_name, mode)
    low_precision = MODES[mode]

    _, calls = _run_steps(model, x, mode)

    seen_dtypes = set()
    for name, fake_quant in _fake_quants(model):
        fake_quant_input, fake_quant_output = calls[name][-1]
        seen_dtypes.add(fake_quant_input.dtype)
        assert fake_quant_output.dtype == fake_quant_input.dtype, name

        # The last call used the qparams that the module keeps after it.
        expected = qatcore.fake_quantize_reference(
            fake_quant_input.float(),
            fake_quant.scale,
            fake_quant.zero_point,
            fake_quant.quant_min,
            fake_quant.quant_max,
            fake_quant.spec.axis,
        )
        dtype = fake_quant_input.dtype
        # Casting a float32 value to a dtype with unit roundoff u moves it by at most u * |value|.
        unit_roundoff = torch.finfo(dtype).eps / 2
        error = (fake_quant_output.float() - expected).abs()
        assert (error <= unit_roundoff * expected.abs()).all(), (
            f"{name}: max error {error.max().item()} in {dtype}"
        )
        assert torch.equal(fake_quant_output, expected.to(dtype)), name

    # NOTE: under autocast the BN fold rescales the bf16 conv output with
    # float32 BN statistics, so the fused module's fake quantizers see float32,
    # as in torch.ao's ConvBnReLU2d (torch 2.13), although the float
    # conv-BN-ReLU returns bf16. That case checks the float32 math only.
    if not (mode == "autocast-bf16" and model_name == "conv-bn-relu"):
        assert low_precision in seen_dtypes
