"""qatcore: quantization-aware training for PyTorch, extended by plugins.

The usual flow::

    qat_model = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    ...  # train
    int8_model = qatcore.convert(qat_model, "x86")  # or qatcore.to_float(qat_model)
"""

from qatcore._api import (
    get_qconfig,
    register_fusion,
    register_kernel,
    register_module,
    register_observer,
    register_observing_kernel,
    register_plugin,
    unregister_plugin,
)
from qatcore._batchnorm import BatchNormFolding
from qatcore._config import OUTPUT_CHANNELS, QConfig, QuantSpec
from qatcore._deploy import (
    DeployError,
    QuantizedLayer,
    QuantParams,
    convert,
    export,
    quantized_layers,
    replace_layers,
)
from qatcore._fake_quantize import FakeQuantize
from qatcore._hookspecs import hookimpl
from qatcore._int8 import Int8Layer, TorchEngineConverter
from qatcore._observer import Observer, RangeObserver, finite_min_max
from qatcore._plan import FusedAway, Plan, PlanEntry, plan
from qatcore._plugins import PluginError, PluginManager, PluginUnavailable, plugin_manager
from qatcore._protocol import (
    QATConvNd,
    QATModule,
    SwapError,
    build_fake_quant,
    check_float_modules,
    copy_parameter,
    qualified_name,
)
from qatcore._reference import (
    check_qparams,
    fake_quantize_learnable_reference,
    fake_quantize_reference,
    prepare_learnable_qparams,
    prepare_qparams,
    qparams_from_min_max,
    quantization_error,
    reduce_to_qparams,
)
from qatcore._registry import Registry, RegistryError
from qatcore._swap import (
    enable_fake_quant,
    freeze_bn_stats,
    freeze_observers,
    nonfinite_counts,
    set_observer_sync,
    swap_modules,
    to_float,
)
from qatcore._warnings import CoverageWarning, QatcoreWarning

__version__ = "0.1.0"

__all__ = [
    "TorchEngineConverter",
    "Int8Layer",
    "replace_layers",
    "quantized_layers",
    "export",
    "convert",
    "QuantParams",
    "QuantizedLayer",
    "DeployError",
    "BatchNormFolding",
    "CoverageWarning",
    "FakeQuantize",
    "FusedAway",
    "OUTPUT_CHANNELS",
    "Observer",
    "Plan",
    "PlanEntry",
    "PluginError",
    "PluginManager",
    "PluginUnavailable",
    "QATConvNd",
    "QATModule",
    "QConfig",
    "QatcoreWarning",
    "QuantSpec",
    "RangeObserver",
    "Registry",
    "RegistryError",
    "SwapError",
    "build_fake_quant",
    "check_float_modules",
    "copy_parameter",
    "check_qparams",
    "enable_fake_quant",
    "fake_quantize_learnable_reference",
    "fake_quantize_reference",
    "finite_min_max",
    "freeze_bn_stats",
    "freeze_observers",
    "get_qconfig",
    "hookimpl",
    "nonfinite_counts",
    "plan",
    "plugin_manager",
    "prepare_learnable_qparams",
    "prepare_qparams",
    "qparams_from_min_max",
    "quantization_error",
    "qualified_name",
    "reduce_to_qparams",
    "register_fusion",
    "register_kernel",
    "register_module",
    "register_observer",
    "register_observing_kernel",
    "register_plugin",
    "set_observer_sync",
    "swap_modules",
    "to_float",
    "unregister_plugin",
]
