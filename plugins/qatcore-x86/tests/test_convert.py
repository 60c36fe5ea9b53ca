"""Int8 conversion for the x86 backend: every conv and linear kind, compared with the QAT model."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import qatcore
from qatcore.testing import DeployCase, check_deployed_output, deploy_cases, train_deploy_case

pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")

BACKEND = "x86"

pytestmark = pytest.mark.skipif(
    BACKEND not in torch.backends.quantized.supported_engines,
    reason=f"this torch build has no {BACKEND} quantized engine",
)

CASES = {case.name: case for case in deploy_cases()}
INPUT_FACTORS = (pytest.param(1.0, id="calibrated"), pytest.param(50.0, id="far-outside"))


@pytest.fixture(autouse=True)
def _restore_engine() -> Iterator[None]:
    # convert() selects the backend's engine for the whole process.
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@functools.cache
def _trained(name: str) -> nn.Sequential:
    return train_deploy_case(CASES[name], qatcore.get_qconfig(BACKEND))


def _inputs(qat: nn.Sequential, case: DeployCase, factor: float) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(case.input_shape) * factor
    if factor > 1:
        # The far-outside inputs exceed the input quantizer's range on both
        # sides, so the int8 input saturates where the QAT input does.
        quantizer = qat[0].input_quantizer()
        scale, zero_point = quantizer.qparams()
        assert x.max().item() > float((quantizer.quant_max - zero_point) * scale)
        assert x.min().item() < float((quantizer.quant_min - zero_point) * scale)
    return x


@pytest.mark.parametrize("factor", INPUT_FACTORS)
@pytest.mark.parametrize("name", list(CASES))
def test_pattern_matches_qat(name: str, factor: float) -> None:
    case = CASES[name]
    qat = _trained(name)
    x = _inputs(qat, case, factor)

    int8 = qatcore.convert(qat, BACKEND)

    assert type(qat[0]).__name__ == case.qat_type_name
    assert qat[0].input_quantizer() is not None
    # The second layer takes the first one's quantized output, so it has no
    # input quantizer and the int8 model passes the first layer's codes on.
    assert qat[-1].input_quantizer() is None
    with torch.no_grad():
        check_deployed_output(qat, qat(x), int8(x))
