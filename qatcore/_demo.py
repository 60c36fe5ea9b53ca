"""The ``qatcore demo`` job: train a small CNN on digits, swap it to QAT, fine-tune, compare.

The images are the 1,797 8x8 handwritten digits that scikit-learn ships
(``sklearn.datasets.load_digits``), so nothing is downloaded. Every step is a
function that tests call with small sizes; :func:`run_demo` chains them.
Nothing here prints: progress goes to a callback, results come back as a
:class:`DemoResult`, and the CLI writes both.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from qatcore._api import get_qconfig
from qatcore._config import QConfig
from qatcore._deploy import DeployError, convert, export, quantized_layers
from qatcore._fake_quantize import FakeQuantize
from qatcore._plan import Plan, plan
from qatcore._plugins import plugin_manager
from qatcore._swap import freeze_observers, swap_modules
from qatcore._warnings import CoverageWarning

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_QAT_EPOCHS",
    "DIGITS_SAMPLES",
    "MIN_SAMPLES",
    "ONNX_NAME",
    "STATE_DICT_NAME",
    "DemoResult",
    "DeployedAccuracy",
    "DigitsSplit",
    "MissingDependencyError",
    "ProgressBar",
    "TrainingStep",
    "build_model",
    "deployed_accuracies",
    "evaluate",
    "load_digits_split",
    "run_demo",
    "train",
]

DIGITS_SAMPLES = 1797
"""Number of images in scikit-learn's digits data set."""

MIN_SAMPLES = 50
"""Minimum number of images per run, so that the stratified test split has every class."""

SPLIT_SEED = 0
"""Seed of the train/test split, fixed so that every training seed is scored on the same images."""

TEST_FRACTION = 0.2
PIXEL_MAX = 16.0
"""The digits pixels are integers from 0 to 16."""

DEFAULT_EPOCHS = 20
DEFAULT_QAT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
FLOAT_LEARNING_RATE = 3e-3
QAT_LEARNING_RATE = 3e-4
QPARAM_LEARNING_RATE = 1e-5
STATE_DICT_NAME = "qat_state_dict.pt"
ONNX_NAME = "model.onnx"

DEMO_THREADS = 1
"""Intra-op threads while the demo runs.

Batches of 32 images of 8x8 pixels are too small to gain from more threads.
On a 2-core machine whose other core was busy, a default run with two
threads took 50-80 s instead of 8-12 s with one (torch 2.13.0, CPU build),
because each thread waits for the other. One thread also makes the results
independent of the machine's core count.
"""


class MissingDependencyError(ImportError):
    """An optional dependency of the demo is not installed."""


@attrs.frozen
class DigitsSplit:
    """The digits images as float32 tensors of shape ``(N, 1, 8, 8)`` in [0, 1], with labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@attrs.frozen
class TrainingStep:
    """One optimizer step, as reported to a progress callback.

    Attributes:
        stage: ``"float"`` or ``"qat"``.
        epoch: 1-based epoch number.
        epochs: Number of epochs of this stage.
        step: 1-based step number within the epoch.
        steps: Number of steps per epoch.
        loss: The batch's cross-entropy loss.
    """

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float


@attrs.frozen
class DemoResult:
    """Accuracies, plan and model of one :func:`run_demo` call.

    Attributes:
        float_accuracy: Test accuracy of the float model, in [0, 1].
        qat_accuracy: Test accuracy of the QAT model in eval mode, in [0, 1].
        plan: The swap plan applied to the float model.
        qat_model: The fine-tuned QAT model, in eval mode.
        qconfig_name: Name of the preset QConfig used.
        train_size: Number of training images.
        test_size: Number of test images.
        seconds: Wall time of training, swap and evaluation.
        state_dict_path: Where the QAT ``state_dict`` was saved, if it was.
        deployed: The int8 accuracies: with the converter registered under
            the preset's name (the x86 engine for ``x86``), and in ONNX
            Runtime through the exporter registered under the preset's name
            or ``"onnx"``.
    """

    float_accuracy: float
    qat_accuracy: float
    plan: Plan
    qat_model: nn.Module
    qconfig_name: str
    train_size: int
    test_size: int
    seconds: float
    state_dict_path: Path | None = None
    deployed: tuple[DeployedAccuracy, ...] = ()


@attrs.frozen
class DeployedAccuracy:
    """Test accuracy of the QAT model once deployed in int8, or why it was not measured.

    Attributes:
        target: Where the int8 model ran, such as ``"x86 engine"`` or ``"ONNX Runtime"``.
        accuracy: Test accuracy in [0, 1], or ``None`` when not measured.
        agreement: Fraction of test images labelled as the QAT model labels
            them, or ``None`` when not measured.
        max_steps: Largest difference of the int8 logits to the QAT model's,
            in steps of the output scale, or ``None`` when not measured.
        reason: Why it was not measured, with the fix; empty when it was.
        path: The exported file, for a target that runs one.
    """

    target: str
    accuracy: float | None = None
    agreement: float | None = None
    max_steps: float | None = None
    reason: str = ""
    path: Path | None = None


ProgressCallback = Callable[[TrainingStep], None]


def load_digits_split(samples: int | None = None) -> DigitsSplit:
    """Load scikit-learn's digits and split them 80/20, stratified by class, with a fixed seed.

    Args:
        samples: Use a stratified subset of this many images instead of all
            1,797, for short runs.

    Raises:
        MissingDependencyError: scikit-learn is not installed.
        ValueError: ``samples`` is below :data:`MIN_SAMPLES` or above
            :data:`DIGITS_SAMPLES`.
    """
    if samples is not None and not MIN_SAMPLES <= samples <= DIGITS_SAMPLES:
        raise ValueError(
            f"samples must be between {MIN_SAMPLES} and {DIGITS_SAMPLES}, got {samples}"
        )
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise MissingDependencyError(
            "the demo needs scikit-learn for its digits images, and it is not installed "
            f"({error}); install it with: pip install 'qatcore[demo]'"
        ) from error

    digits = load_digits()
    images = digits.images
    labels = digits.target
    if samples is not None and samples < len(labels):
        images, _, labels, _ = train_test_split(
            images, labels, train_size=samples, random_state=SPLIT_SEED, stratify=labels
        )
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(
        _to_image_tensor(train_images),
        torch.as_tensor(train_labels, dtype=torch.int64),
        _to_image_tensor(test_images),
        torch.as_tensor(test_labels, dtype=torch.int64),
    )


def _to_image_tensor(images: object) -> torch.Tensor:
    tensor = torch.as_tensor(images, dtype=torch.float32) / PIXEL_MAX
    return tensor.unsqueeze(1)


def build_model() -> nn.Sequential:
    """Build the demo CNN for ``(N, 1, 8, 8)`` images: three conv-BN-ReLU blocks and a conv head.

    Each conv-BN-ReLU block is fused into one QAT module that folds the
    BatchNorm into the conv weight before fake quantization. The head conv
    is swapped on its own, and the pooling and flatten layers stay float.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 10, kernel_size=2),
        nn.Flatten(),
    )


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    learning_rate: float,
    generator: torch.Generator,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stage: str = "float",
    progress: ProgressCallback | None = None,
    observe_epochs: int | None = None,
) -> None:
    """Train ``model`` in place with Adam and cross-entropy, shuffling with ``generator``.

    Learnable scales and zero points train with :data:`QPARAM_LEARNING_RATE`,
    because Adam moves every parameter by about the learning rate per step
    and a scale is far smaller than a weight. With ``observe_epochs`` the
    observers are frozen after that many epochs, so that learnable qparams
    start from the observed ones and then train.
    """
    qparams = [
        parameter
        for module in model.modules()
        if isinstance(module, FakeQuantize)
        for parameter in module.parameters(recurse=False)
    ]
    chosen = {id(parameter) for parameter in qparams}
    others = [parameter for parameter in model.parameters() if id(parameter) not in chosen]
    groups: list[dict[str, object]] = [{"params": others, "lr": learning_rate}]
    if qparams:
        groups.append({"params": qparams, "lr": QPARAM_LEARNING_RATE})
    optimizer = torch.optim.Adam(groups)
    steps = math.ceil(len(labels) / batch_size)
    model.train()
    for epoch in range(1, epochs + 1):
        if observe_epochs is not None and epoch == observe_epochs + 1:
            freeze_observers(model)
        order = torch.randperm(len(labels), generator=generator)
        for step in range(1, steps + 1):
            batch = order[(step - 1) * batch_size : step * batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(TrainingStep(stage, epoch, epochs, step, steps, loss.item()))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Put ``model`` in eval mode and return the fraction of ``images`` it labels correctly."""
    model.eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    return int((predictions == labels).sum()) / len(labels)


def demo_qconfig(
    name: str, *, observer: str | None = None, bits: int | None = None, learnable: bool = False
) -> QConfig:
    """Return the preset ``name`` with its weight and output specs changed as asked.

    Raises:
        KeyError: No preset is registered as ``name``.
        ValueError: ``bits`` is not a valid bit width.
    """
    changes: dict[str, object] = {}
    if observer is not None:
        changes["observer"] = observer
        changes["observer_options"] = {}
    if bits is not None:
        changes["bits"] = bits
    if learnable:
        changes["learnable"] = True
    qconfig = get_qconfig(name)
    specs = {
        field: None if spec is None else attrs.evolve(spec, **changes)
        for field, spec in (("weight", qconfig.weight), ("activation", qconfig.activation))
    }
    return attrs.evolve(qconfig, **specs)


def run_demo(
    *,
    epochs: int = DEFAULT_EPOCHS,
    qat_epochs: int = DEFAULT_QAT_EPOCHS,
    seed: int = 0,
    qconfig_name: str = "x86",
    observer: str | None = None,
    bits: int | None = None,
    learnable: bool = False,
    samples: int | None = None,
    output: Path | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Train the float CNN, swap it to QAT with a preset, fine-tune it, and score both.

    The same ``seed`` gives the same weights, batches and accuracies on the
    same CPU type and torch build; the train/test split never depends on it.
    Training runs on :data:`DEMO_THREADS` intra-op threads. The caller's
    global random state and thread count are left as they were.

    Args:
        epochs: Float training epochs.
        qat_epochs: QAT fine-tuning epochs.
        seed: Seed of the initial weights and of the batch order.
        qconfig_name: Preset QConfig to swap with, as ``qatcore.get_qconfig`` names it.
        observer: Observer name for the weights and outputs instead of the
            preset's, such as ``"histogram"``.
        bits: Bit width of the weights and outputs instead of the preset's.
        learnable: Train the scales (LSQ) and affine zero points (LSQ+).
        samples: Use this many images instead of all 1,797.
        output: Folder to save the QAT ``state_dict`` in, as
            ``qat_state_dict.pt``, and the ONNX export, as ``model.onnx``;
            created if missing.
        progress: Called after every optimizer step.

    Raises:
        KeyError: No preset QConfig is registered as ``qconfig_name``.
        MissingDependencyError: scikit-learn is not installed.
        ValueError: ``epochs`` or ``qat_epochs`` is below 1, ``qat_epochs``
            is below 2 with ``learnable``, ``samples`` is out of range, or
            ``bits`` is not a valid bit width.
        SwapError: The model cannot be swapped with the preset.
        OSError: ``output`` cannot be created or written to.
    """
    for name, value in (("epochs", epochs), ("qat_epochs", qat_epochs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if learnable and qat_epochs < 2:
        raise ValueError(
            f"learnable scales need qat_epochs of at least 2, got {qat_epochs}: the first "
            "QAT epoch initialises them from the observers, the later ones train them"
        )
    qconfig = demo_qconfig(qconfig_name, observer=observer, bits=bits, learnable=learnable)
    data = load_digits_split(samples)
    state_dict_path = None if output is None else _prepare_output(output)
    started = time.perf_counter()

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    # A swap of the untrained model fails where the real swap would, before
    # any training time is spent. Its warnings come again with the real swap.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        swap_modules(model, qconfig)
    with _intra_op_threads(DEMO_THREADS):
        train(
            model,
            data.train_images,
            data.train_labels,
            epochs=epochs,
            learning_rate=FLOAT_LEARNING_RATE,
            generator=generator,
            progress=progress,
        )
        float_accuracy = evaluate(model, data.test_images, data.test_labels)

        swap_plan = plan(model, qconfig)
        qat_model = swap_modules(model, qconfig)
        train(
            qat_model,
            data.train_images,
            data.train_labels,
            epochs=qat_epochs,
            learning_rate=QAT_LEARNING_RATE,
            generator=generator,
            stage="qat",
            progress=progress,
            observe_epochs=1 if learnable else None,
        )
        qat_accuracy = evaluate(qat_model, data.test_images, data.test_labels)
        deployed = deployed_accuracies(qat_model, qconfig_name, data, output)
    seconds = time.perf_counter() - started

    if state_dict_path is not None:
        try:
            torch.save(qat_model.state_dict(), state_dict_path)
        except RuntimeError as error:  # torch.save reports file errors as RuntimeError
            raise OSError(f"cannot write {state_dict_path}: {error}") from None

    return DemoResult(
        float_accuracy=float_accuracy,
        qat_accuracy=qat_accuracy,
        plan=swap_plan,
        qat_model=qat_model,
        qconfig_name=qconfig_name,
        train_size=len(data.train_labels),
        test_size=len(data.test_labels),
        seconds=seconds,
        state_dict_path=state_dict_path,
        deployed=deployed,
    )


def _scores(
    qat_model: nn.Module, logits: torch.Tensor, expected: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Return the accuracy, agreement with the QAT model and largest logit difference in steps."""
    layers = quantized_layers(qat_model)
    step = float(layers[-1].output.scale)
    return {
        "accuracy": int((logits.argmax(dim=1) == labels).sum()) / len(labels),
        "agreement": float((logits.argmax(dim=1) == expected.argmax(dim=1)).float().mean()),
        # Both logits lie on the output grid up to float32 rounding, so the
        # difference is a whole number of steps to well within 1e-4.
        "max_steps": round(float((logits - expected).abs().max()) / step, 4),
    }


def deployed_accuracies(
    qat_model: nn.Module, qconfig_name: str, data: DigitsSplit, output: Path | None = None
) -> tuple[DeployedAccuracy, ...]:
    """Convert and export the trained ``qat_model`` to int8 and score it on the test images.

    Two targets are tried: the converter registered under ``qconfig_name``
    (PyTorch's x86 engine for the ``x86`` preset), and ONNX Runtime
    through the exporter registered under ``qconfig_name`` or ``"onnx"``.
    A target whose plugin is missing, or that cannot take the model, is
    reported with the reason. The ONNX file is written to ``output`` as
    ``model.onnx`` when ``output`` is given. The quantized engine of the
    process is left as it was.
    """
    registry = plugin_manager().registry
    images, labels = data.test_images, data.test_labels
    with torch.no_grad():
        expected = qat_model.eval()(images)
    results = []

    previous_engine = torch.backends.quantized.engine
    try:
        if qconfig_name in registry.converters:
            engine = getattr(registry.converters[qconfig_name], "engine", None)
            target = f"{engine} engine" if engine else f"{qconfig_name} backend"
            try:
                int8_model = convert(qat_model, qconfig_name, example_inputs=(images,))
                with torch.no_grad():
                    logits = int8_model(images)
                results.append(
                    DeployedAccuracy(target, **_scores(qat_model, logits, expected, labels))
                )
            except DeployError as error:
                results.append(DeployedAccuracy(target, reason=str(error)))
    finally:
        torch.backends.quantized.engine = previous_engine

    export_format = qconfig_name if qconfig_name in registry.exporters else "onnx"
    target = "ONNX Runtime"
    if export_format not in registry.exporters:
        reason = registry.exporters.missing_message(export_format)
        results.append(DeployedAccuracy(target, reason=reason))
        return tuple(results)
    with tempfile.TemporaryDirectory() as folder:
        path = (output if output is not None else Path(folder)) / ONNX_NAME
        try:
            report = export(qat_model, path, (images,), format=export_format)
        except DeployError as error:
            results.append(DeployedAccuracy(target, reason=str(error)))
            return tuple(results)
        scores = _scores(qat_model, report.outputs[0], expected, labels)
        saved_path = path if output is not None else None
        results.append(DeployedAccuracy(target, path=saved_path, **scores))
    return tuple(results)


def _prepare_output(output: Path) -> Path:
    """Create ``output`` and check that the state_dict file can be written there.

    Raises:
        OSError: ``output`` is a file, cannot be created, or is not writable,
            or the state_dict path is a folder.
    """
    if output.exists() and not output.is_dir():
        raise OSError(f"{output} is a file; --output takes a folder")
    output.mkdir(parents=True, exist_ok=True)
    path = output / STATE_DICT_NAME
    if path.is_dir():
        raise OSError(f"{path} is a folder, so the state_dict cannot be saved there")
    with tempfile.NamedTemporaryFile(dir=output):
        pass
    return path


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ProgressBar:
    """Draw a one-line progress bar per epoch on a text stream.

    On a terminal the line is redrawn in place after each step. On any other
    stream, such as a log file or a pipe, only the finished line of each
    epoch is written, so that logs stay readable.
    """

    WIDTH = 24

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()

    def __call__(self, step: TrainingStep) -> None:
        finished = step.step == step.steps
        if not (self.interactive or finished):
            return
        filled = self.WIDTH * step.step // step.steps
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = (
            f"{step.stage:<5} epoch {step.epoch}/{step.epochs} [{bar}] "
            f"{step.step}/{step.steps} loss {step.loss:.4f}"
        )
        prefix = "\r" if self.interactive else ""
        self.stream.write(prefix + line + ("\n" if finished else ""))
        self.stream.flush()
