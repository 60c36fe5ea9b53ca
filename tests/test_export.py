"""torch.export of swapped models in eval mode: the graph computes what eager eval mode does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.export import Dim

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")


def _conv_bn_relu_2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _conv_1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 5, stride=2), nn.BatchNorm1d(6), nn.Conv1d(6, 3, 3, padding="same")
    )


def _conv_3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())


def _transposed_2d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(3, 6, 3, stride=2, output_padding=1), nn.BatchNorm2d(6), nn.ReLU()
    )


def _linear_bn_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv2d-bn-relu-depthwise-linear": (_conv_bn_relu_2d, (3, 8, 8)),
    "conv1d-bn-conv1d": (_conv_1d, (2, 40)),
    "conv3d-bn-relu": (_conv_3d, (3, 4, 6, 6)),
    "conv-transpose2d-bn-relu": (_transposed_2d, (3, 5, 5)),
    "linear-bn-relu-linear": (_linear_bn_relu, (12,)),
}


def _trained_qat_model(build: Callable[[], nn.Module], sample: tuple[int, ...]) -> nn.Module:
    """Swap with the x86 preset and train a few steps, so that qparams and BN statistics move."""
    torch.manual_seed(0)
    model = qatcore.swap_modules(build(), qatcore.get_qconfig("x86"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad()
        model(torch.randn(4, *sample, generator=generator)).square().mean().backward()
        optimizer.step()
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize(("build", "sample"), list(MODELS.values()), ids=list(MODELS))
def test_exported_eval_model_matches_eager(
    build: Callable[[], nn.Module], sample: tuple[int, ...]
) -> None:
    model = _trained_qat_model(build, sample)
    example = torch.randn(3, *sample, generator=torch.Generator().manual_seed(10))
    before = _state(model)

    exported = torch.export.export(model, (example,))

    # Eval mode updates no observer and no BN statistic, so the graph mutates no buffer.
    assert exported.graph_signature.buffers_to_mutate == {}
    inputs = torch.randn(3, *sample, generator=torch.Generator().manual_seed(11)) * 3
    with torch.no_grad():
        expected = model(inputs)
        actual = exported.module()(inputs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    after = _state(model)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed during export"


def test_exported_model_takes_any_batch_size() -> None:
    build, sample = MODELS["conv2d-bn-relu-depthwise-linear"]
    model = _trained_qat_model(build, sample)
    example = torch.randn(2, *sample)

    exported = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},))

    for batch in (1, 5, 16):
        inputs = torch.randn(batch, *sample, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(inputs), model(inputs), rtol=0, atol=0)


def test_exported_graph_keeps_trained_qparams_as_buffers() -> None:
    build, sample = MODELS["conv2d-bn-relu-depthwise-linear"]
    model = _trained_qat_model(build, sample)

    exported = torch.export.export(model, (torch.randn(2, *sample),))

    state = exported.state_dict
    scales = {name: value for name, value in state.items() if name.endswith("fake_quant.scale")}
    expected = {
        name: value
        for name, value in model.state_dict().items()
        if name.endswith("fake_quant.scale")
    }
    assert scales.keys() == expected.keys()
    # Weight and output of the three QAT modules, and the input of the first.
    # The depthwise conv and the linear layer read the previous module's output codes.
    assert len(scales) == 7
    assert "0.input_fake_quant.scale" in scales
    assert "3.input_fake_quant.scale" not in scales
    assert "6.input_fake_quant.scale" not in scales
    for name, value in expected.items():
        assert torch.equal(scales[name], value), name
        assert not torch.equal(value, torch.ones_like(value)), f"{name} was never observed"
