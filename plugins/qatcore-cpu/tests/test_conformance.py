"""The CPU kernels pass the core's kernel conformance suite, case by case."""

from __future__ import annotations

import pytest

from qatcore.testing import KernelCase, check_kernel_case, kernel_cases
from qatcore_cpu.kernel import fake_quantize_cpu
from qatcore_cpu.learnable import fake_quantize_learnable_cpu


@pytest.mark.parametrize("case", kernel_cases(), ids=str)
def test_cpu_kernel_matches_reference(case: KernelCase) -> None:
    check_kernel_case(fake_quantize_cpu, case)


@pytest.mark.parametrize("case", kernel_cases(learnable=True), ids=str)
def test_learnable_cpu_kernel_matches_reference(case: KernelCase) -> None:
    check_kernel_case(fake_quantize_learnable_cpu, case, learnable=True)
