"""The ``onnx`` exporter: a trained QAT model as an ONNX graph with Q/DQ pairs and int8 weights."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import attrs
import onnx
import onnxruntime
import torch
from torch import nn

import qatcore
from qatcore import DeployError, QATModule, qualified_name
from qatcore_onnx._checks import (
    MAX_OPSET,
    check_float32,
    check_opset,
    check_path,
    check_runs,
    first_line,
)
from qatcore_onnx._graph import store_weight_codes
from qatcore_onnx._qdq import QDQLayer
from qatcore_onnx._quiet import quiet_export
from qatcore_onnx._runtime import run_onnx

__all__ = ["MAX_OPSET", "OnnxReport", "export_onnx"]

# TypeError comes from the exporter's op translations, such as an out= argument:
# the model itself has run on the example inputs before the export starts.
_OnnxErrors = (torch.onnx.errors.OnnxExporterError, RuntimeError, TypeError)

MAX_DIFF_STEPS = 1
"""The largest difference to the QAT model, in output steps, that export_onnx accepts."""

# The errors ONNX Runtime raises when it cannot load or run a graph; they
# derive from Exception directly.
_ORT_STATE = onnxruntime.capi.onnxruntime_pybind11_state
_ORT_ERRORS = (
    _ORT_STATE.Fail,
    _ORT_STATE.InvalidArgument,
    _ORT_STATE.InvalidGraph,
    _ORT_STATE.NotImplemented,
    _ORT_STATE.RuntimeException,
)


@attrs.frozen(kw_only=True)
class OnnxReport:
    """What :func:`export_onnx` wrote and how closely ONNX Runtime reproduces the QAT model.

    Attributes:
        path: The ONNX file.
        opset: The ONNX opset of the default domain.
        weights: How many weights are stored as 8-bit codes read by
            DequantizeLinear.
        max_abs_diff: Maximum absolute difference between ONNX Runtime's
            outputs and the QAT model's outputs in eval mode on the example
            inputs, or ``None`` when the export ran with ``check=False``.
        max_diff_steps: ``max_abs_diff`` in quantization steps (scales) of
            the output quantizer, rounded to 1e-4 steps, over the outputs
            that are a QAT layer's quantized output; ``None`` when no output
            is, or without a check.
        nan_outputs: How many output values are NaN in the QAT model, as
            after a NaN in the example inputs. ONNX Runtime's int8 ops have
            no NaN code and return finite values there, so these positions
            are left out of ``max_abs_diff`` and ``max_diff_steps``.
        outputs: ONNX Runtime's outputs on the example inputs, empty
            without a check.
    """

    path: Path
    opset: int
    weights: int
    max_abs_diff: float | None = None
    max_diff_steps: float | None = None
    nan_outputs: int = 0
    outputs: tuple[torch.Tensor, ...] = attrs.field(default=(), eq=False, repr=False)

    def __str__(self) -> str:
        lines = [f"ONNX model: {self.path} (opset {self.opset}, {self.weights} int8 weights)"]
        if self.max_abs_diff is None:
            lines.append("not run in ONNX Runtime (check=False)")
            return "\n".join(lines)
        difference = f"max abs difference to the QAT model: {self.max_abs_diff:.6g}"
        if self.max_diff_steps is not None:
            difference += f" ({self.max_diff_steps:.3g} output quantization steps)"
        lines.append(difference)
        if self.nan_outputs:
            lines.append(
                f"{self.nan_outputs} output values are NaN in the QAT model and left out of the "
                "difference: ONNX Runtime's int8 ops have no NaN code and return finite values"
            )
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    path: str | PathLike[str],
    example_inputs: tuple[Any, ...] | torch.Tensor,
    *,
    opset: int = 17,
    check: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> OnnxReport:
    """Export the trained QAT ``model`` to ``path`` as ONNX with QuantizeLinear/DequantizeLinear.

    Every QAT layer becomes its float op (BatchNorm folded) between Q/DQ
    pairs: one per tensor on the input, a DequantizeLinear on the weight
    stored as 8-bit codes (per channel along the weight's axis), and one
    after the fused activation on the output. An input that another
    layer's output quantizer quantized gets that quantizer's scale and zero
    point again, which leaves its values unchanged and lets ONNX Runtime
    fuse the layer into an int8 op across a Flatten or MaxPool. Float ops
    between layers stay float. The scales and zero points are the fake
    quantizers'. An activation range narrower than its 8-bit type
    (narrow_range, fewer bits) gets a Clip after its DequantizeLinear,
    which reproduces QAT's clamp exactly.

    ``model`` is first run in eval mode on ``example_inputs``. The file is
    verified with ``onnx.checker.check_model(full_check=True)``. With
    ``check`` it is also run in ONNX Runtime (CPU, all graph optimizations)
    on ``example_inputs`` and compared with ``model`` in eval mode.
    ``model`` is left unchanged, training mode included.

    Args:
        model: The trained QAT model.
        path: Where to write the ``.onnx`` file.
        example_inputs: The positional inputs of one forward call.
        opset: The ONNX opset, 10 to 20; per-channel weights need 13.
        check: Run the file in ONNX Runtime and measure the difference.
        input_names: Names of the graph inputs, as ``torch.onnx.export`` takes them.
        output_names: Names of the graph outputs.
        dynamic_axes: Axes of inputs and outputs whose size may vary, by
            name, as ``torch.onnx.export`` takes them.

    Raises:
        DeployError: The opset is outside 10 to 20, or too old for the Q/DQ
            a layer needs. The model has float64 parameters, or raises on
            ``example_inputs``. A layer computes an op or uses a quant range
            the export cannot write. Or torch, the ONNX checker or ONNX
            Runtime rejects the graph. The message names the module when it
            can be found.
        FileNotFoundError: The folder of ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
    """
    path = Path(path)
    check_path(path)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    inputs = tuple(inputs)
    if input_names is None:
        input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    layers = qatcore.quantized_layers(model)
    check_opset(opset, layers)
    check_float32(model)

    with _restored_modes(model):
        check_runs(model, inputs)
        export_model = qatcore.replace_layers(model, QDQLayer)
        codes_by_name = {
            f"{name}.weight" if name else "weight": module.weight_codes
            for name, module in export_model.named_modules(remove_duplicate=False)
            if isinstance(module, QDQLayer)
        }
        proto = _torch_export(
            model,
            export_model,
            inputs,
            opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
        weights = store_weight_codes(proto, codes_by_name)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as error:
            raise DeployError(
                f"qatcore_onnx.export_onnx: the ONNX checker rejects the graph exported from "
                f"{type(model).__name__} at opset {opset}: {first_line(error)}"
            ) from None
        onnx.save(proto, path)
        if not check:
            return OnnxReport(path=path, opset=opset, weights=weights)
        comparison = _compare(model, path, inputs)
    if comparison.max_diff_steps is not None and comparison.max_diff_steps > MAX_DIFF_STEPS:
        raise DeployError(
            f"qatcore_onnx.export_onnx: ONNX Runtime's output of {path} differs from "
            f"{type(model).__name__}'s by {comparison.max_diff_steps:g} output quantization "
            f"steps on the example inputs, where at most {MAX_DIFF_STEPS} is expected, so the "
            "file does not compute what the model computes. torch.onnx.export records no "
            "write to a tensor's .data and no in-place change of a slice; make such changes "
            "with ops that return a new tensor, then export again"
        )
    return OnnxReport(
        path=path,
        opset=opset,
        weights=weights,
        max_abs_diff=comparison.max_abs_diff,
        max_diff_steps=comparison.max_diff_steps,
        nan_outputs=comparison.nan_outputs,
        outputs=comparison.outputs,
    )


@contextlib.contextmanager
def _restored_modes(model: nn.Module) -> Iterator[None]:
    """Restore the training mode of every module of ``model`` on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _export_to_bytes(
    module: nn.Module, inputs: tuple[Any, ...], opset: int, **options: Any
) -> bytes:
    buffer = io.BytesIO()
    with quiet_export(), torch.no_grad():
        torch.onnx.export(module, inputs, buffer, opset_version=opset, dynamo=False, **options)
    return buffer.getvalue()


def _torch_export(
    model: nn.Module,
    export_model: nn.Module,
    inputs: tuple[Any, ...],
    opset: int,
    **options: Any,
) -> onnx.ModelProto:
    try:
        data = _export_to_bytes(export_model, inputs, opset, **options)
    except _OnnxErrors as error:
        culprit = _failing_module(model, export_model, inputs, opset)
        raise DeployError(
            f"{culprit}: torch.onnx.export cannot write it at opset {opset}: "
            f"{first_line(error)}; keep that part out of the exported model, or use another "
            "opset if the op needs one"
        ) from error
    return onnx.load_from_string(data)


def _failing_module(
    model: nn.Module, export_model: nn.Module, inputs: tuple[Any, ...], opset: int
) -> str:
    """Name the innermost module that fails to export alone, or the model when none does."""
    captured: dict[str, tuple[Any, ...]] = {}
    handles = []
    for name, module in export_model.named_modules():
        if not name:
            continue

        def capture(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured.setdefault(name, args)

        handles.append(module.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            export_model(*inputs)
    except Exception:  # the export form may fail anywhere; then nothing is named
        return f"{type(model).__name__} (module not found: its export form raises)"
    finally:
        for handle in handles:
            handle.remove()

    failing = []
    for name, args in captured.items():
        try:
            _export_to_bytes(export_model.get_submodule(name), args, opset)
        except _OnnxErrors:
            failing.append(name)
    innermost = [
        name for name in failing if not any(other.startswith(f"{name}.") for other in failing)
    ]
    if not innermost:
        return f"{type(model).__name__} (in its forward, outside any submodule)"
    name = innermost[0]
    return qualified_name(name, model.get_submodule(name))


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _flatten(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _flatten(item)]
    return []


def _qat_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[list[torch.Tensor], list]:
    """Run ``model`` in eval mode; return its outputs and, per output, the output scale or None.

    An output has a scale when it shares its storage and size with a QAT
    layer's output: that output unchanged or reshaped, so on its grid.
    """
    produced: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    for module in model.modules():
        if isinstance(module, QATModule) and module.output_fake_quant is not None:

            def capture(module: nn.Module, args: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor):
                    scale, _ = module.output_fake_quant.qparams()
                    produced.append((output, scale))

            handles.append(module.register_forward_hook(capture))
    model.eval()
    try:
        with torch.no_grad():
            outputs = _flatten(model(*inputs))
    finally:
        for handle in handles:
            handle.remove()

    scales = []
    for output in outputs:
        scale = None
        for tensor, tensor_scale in produced:
            same_storage = (
                output.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
            )
            if same_storage and output.numel() == tensor.numel() and tensor_scale.numel() == 1:
                scale = tensor_scale
        scales.append(scale)
    return outputs, scales


@attrs.frozen
class _Comparison:
    max_abs_diff: float
    max_diff_steps: float | None
    nan_outputs: int
    outputs: tuple[torch.Tensor, ...]


def _compare(model: nn.Module, path: Path, inputs: tuple[Any, ...]) -> _Comparison:
    expected, scales = _qat_outputs(model, inputs)
    tensors = [tensor for tensor in _flatten(inputs)]
    try:
        actual = run_onnx(path, tensors)
    except _ORT_ERRORS as error:
        raise DeployError(
            f"qatcore_onnx.export_onnx: ONNX Runtime {onnxruntime.__version__} cannot run "
            f"{path}: {first_line(error)}; export with check=False to write the file without "
            "running it"
        ) from None
    actual_list = [actual] if isinstance(actual, torch.Tensor) else list(actual)

    max_abs_diff = 0.0
    max_diff_steps: float | None = None
    nan_outputs = 0
    for want, got, scale in zip(expected, actual_list, scales):
        want = want.detach().cpu()
        # A NaN input makes the QAT model's output NaN, but quantized
        # tensors have no NaN code, so ONNX Runtime returns finite values
        # there. Those positions are counted, not measured.
        nan = torch.isnan(want)
        nan_outputs += int(nan.sum())
        difference = (got.to(want.dtype) - want).abs()[~nan]
        diff = float(difference.max()) if difference.numel() else 0.0
        if math.isnan(diff):
            diff = math.inf
        max_abs_diff = max(max_abs_diff, diff)
        if scale is not None:
            # Both outputs lie on the grid up to float32 rounding of each
            # value (about 1e-7 relative), so whole steps are kept whole.
            steps = round(diff / float(scale), 4)
            max_diff_steps = steps if max_diff_steps is None else max(max_diff_steps, steps)
    return _Comparison(max_abs_diff, max_diff_steps, nan_outputs, tuple(actual_list))
