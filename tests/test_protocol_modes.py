"""Training modes after a swap: QAT modules, their fake quantizers and adopted members."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")

QCONFIG = qatcore.QConfig(
    weight=qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=qatcore.OUTPUT_CHANNELS),
    activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
)

# Every model takes 3 input channels or features and has the QAT module at index 0.
CONV_INPUT = (2, 3, 6, 6)
LINEAR_INPUT = (8, 3)
MODELS: dict[str, tuple[Callable[[], nn.Sequential], tuple[int, ...]]] = {
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), CONV_INPUT),
    "conv-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), CONV_INPUT),
    "conv-transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), CONV_INPUT),
    "linear": (lambda: nn.Sequential(nn.Linear(3, 4)), LINEAR_INPUT),
    "linear-relu": (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU()), LINEAR_INPUT),
    "conv-bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), CONV_INPUT),
    "conv-bn-relu": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        CONV_INPUT,
    ),
    "conv-transpose-bn": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)),
        CONV_INPUT,
    ),
    "linear-bn": (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), LINEAR_INPUT),
}
BN_MODELS = ["conv-bn", "conv-bn-relu", "conv-transpose-bn", "linear-bn"]
RELU_MODELS = ["conv-relu", "linear-relu", "conv-bn-relu"]


def _swap(name: str, mode: bool = True) -> tuple[nn.Sequential, torch.Tensor]:
    """Return the model ``name`` swapped in training mode ``mode``, and an input for it."""
    build, input_shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train(mode)
    return qatcore.swap_modules(model, QCONFIG), torch.randn(input_shape)


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_swap_takes_float_mode(name: str, mode: bool) -> None:
    qat, _ = _swap(name, mode)
    module = qat[0]

    assert isinstance(module, qatcore.QATModule)
    assert module.training == mode
    for role in ("weight", "output"):
        fake_quant = getattr(module, f"{role}_fake_quant")
        assert fake_quant is not None, role
        for part in fake_quant.modules():
            assert part.training == mode, f"{role}: {type(part).__name__}"


@pytest.mark.parametrize("name", BN_MODELS)
def test_eval_swap_then_train_updates_bn(name: str) -> None:
    qat, x = _swap(name, mode=False)
    module = qat[0]
    running_mean = module.bn.running_mean.clone()
    running_var = module.bn.running_var.clone()

    qat.train()
    qat(x)

    assert module.bn.training
    assert not module.freeze_bn
    assert not torch.equal(module.bn.running_mean, running_mean)
    assert not torch.equal(module.bn.running_var, running_var)


@pytest.mark.parametrize("name", BN_MODELS)
def test_eval_bn_stays_eval_until_train(name: str) -> None:
    build, input_shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    model[1].eval()
    x = torch.randn(input_shape)

    qat = qatcore.swap_modules(model, QCONFIG)
    module = qat[0]
    running_mean = module.bn.running_mean.clone()
    qat(x)

    assert module.training
    assert not module.bn.training
    assert not module.freeze_bn
    assert torch.equal(module.bn.running_mean, running_mean)

    qat.train()
    qat(x)

    assert module.bn.training
    assert not torch.equal(module.bn.running_mean, running_mean)


@pytest.mark.parametrize("name", RELU_MODELS)
def test_eval_relu_stays_eval_until_train(name: str) -> None:
    build, _ = MODELS[name]
    model = build().train()
    model[-1].eval()

    qat = qatcore.swap_modules(model, QCONFIG)
    activation = qat[0].activation

    assert qat[0].training
    assert not activation.training
    qat.train()
    assert activation.training


@pytest.mark.parametrize("name", BN_MODELS)
def test_frozen_bn_stays_frozen_through_train(name: str) -> None:
    qat, x = _swap(name)
    module = qat[0]
    qatcore.freeze_bn_stats(qat)
    running_mean = module.bn.running_mean.clone()

    qat.eval()
    qat.train()
    qat(x)

    assert module.training
    assert module.freeze_bn
    assert not module.bn.training
    assert torch.equal(module.bn.running_mean, running_mean)
