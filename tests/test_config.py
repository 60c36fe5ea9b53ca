"""QuantSpec and QConfig: validation at construction, derived ranges, value semantics."""

from __future__ import annotations

import copy
import pickle
import types
from collections.abc import Iterator, Mapping

import attrs
import pytest

import qatcore
from qatcore import OUTPUT_CHANNELS, QConfig, QuantSpec


class _OptionsMapping(Mapping[str, object]):
    """A read-only mapping that is not a dict, as a caller might pass for observer options."""

    def __init__(self, **items: object) -> None:
        self._items = items

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


# (field, rejected value, text that states what the field allows)
INVALID_FIELDS = [
    pytest.param("bits", 1, "between 2 and 16", id="bits-1"),
    pytest.param("bits", 17, "between 2 and 16", id="bits-17"),
    pytest.param("bits", 0, "between 2 and 16", id="bits-0"),
    pytest.param("bits", 8.0, "must be an int", id="bits-float"),
    pytest.param("bits", True, "must be an int", id="bits-bool"),
    pytest.param("bits", "8", "must be an int", id="bits-str"),
    pytest.param("signed", 1, "must be a bool", id="signed-int"),
    pytest.param("signed", None, "must be a bool", id="signed-none"),
    pytest.param("symmetric", "yes", "must be a bool", id="symmetric-str"),
    pytest.param("symmetric", 0, "must be a bool", id="symmetric-int"),
    pytest.param("narrow_range", 1, "must be a bool", id="narrow_range-int"),
    pytest.param("narrow_range", "false", "must be a bool", id="narrow_range-str"),
    pytest.param("axis", -1, "non-negative", id="axis-negative"),
    pytest.param("axis", 1.0, "None (per-tensor), an int", id="axis-float"),
    pytest.param("axis", True, "None (per-tensor), an int", id="axis-bool"),
    pytest.param("axis", "0", "None (per-tensor), an int", id="axis-str"),
    pytest.param("observer", "", "non-empty str", id="observer-empty"),
    pytest.param("observer", None, "non-empty str", id="observer-none"),
    pytest.param("observer", 3, "non-empty str", id="observer-int"),
    pytest.param("kernel", "", "non-empty str", id="kernel-empty"),
    pytest.param("kernel", None, "non-empty str", id="kernel-none"),
    pytest.param("kernel", b"default", "non-empty str", id="kernel-bytes"),
    pytest.param("observer_options", [("averaging_constant", 0.1)], "mapping", id="options-list"),
    pytest.param("observer_options", "averaging_constant", "mapping", id="options-str"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), INVALID_FIELDS)
def test_quantspec_rejects_invalid_field(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}") as excinfo:
        QuantSpec(**{field: value})

    message = str(excinfo.value)
    assert repr(value) in message
    assert allowed in message


@pytest.mark.parametrize(
    "key",
    [pytest.param(1, id="int-key"), pytest.param(("a", "b"), id="tuple-key")],
)
def test_quantspec_rejects_non_str_option_key(key: object) -> None:
    with pytest.raises(
        ValueError, match=r"QuantSpec\.observer_options keys must be str"
    ) as excinfo:
        QuantSpec(observer_options={key: 0.1})

    assert repr(key) in str(excinfo.value)


@pytest.mark.parametrize("bits", range(2, 17), ids=lambda bits: f"bits-{bits}")
def test_quantspec_accepts_every_bit_width(bits: int) -> None:
    assert QuantSpec(bits=bits).bits == bits


@pytest.mark.parametrize(
    "axis",
    [
        pytest.param(None, id="per-tensor"),
        pytest.param(0, id="axis-0"),
        pytest.param(3, id="axis-3"),
        pytest.param(OUTPUT_CHANNELS, id="output-channels"),
    ],
)
def test_quantspec_accepts_axis(axis: int | str | None) -> None:
    spec = QuantSpec(axis=axis)

    assert spec.axis == axis
    assert spec.per_channel is (axis is not None)


def test_output_channels_resolves_to_the_module_axis() -> None:
    spec = QuantSpec(bits=4, axis=OUTPUT_CHANNELS)

    resolved = spec.resolve_axis(1)

    assert resolved.axis == 1
    assert resolved == attrs.evolve(spec, axis=1)


@pytest.mark.parametrize("axis", [None, 0, 2], ids=["per-tensor", "axis-0", "axis-2"])
def test_resolve_axis_keeps_an_explicit_axis(axis: int | None) -> None:
    spec = QuantSpec(axis=axis)

    assert spec.resolve_axis(1) is spec


def test_fake_quantize_rejects_an_unresolved_axis() -> None:
    with pytest.raises(ValueError, match=r"call spec\.resolve_axis\(axis\)"):
        qatcore.FakeQuantize(QuantSpec(axis=OUTPUT_CHANNELS), channels=4)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(None, id="none"),
        pytest.param({}, id="empty-dict"),
        pytest.param({"averaging_constant": 0.01}, id="dict"),
        pytest.param(types.MappingProxyType({"averaging_constant": 0.01}), id="mappingproxy"),
        pytest.param(_OptionsMapping(averaging_constant=0.01), id="custom-mapping"),
    ],
)
def test_quantspec_accepts_option_mappings(options: Mapping[str, object] | None) -> None:
    spec = QuantSpec(observer_options=options)

    assert dict(spec.observer_options) == dict(options or {})


# Hand-computed integer ranges: signed b-bit is [-2**(b-1), 2**(b-1) - 1],
# unsigned is [0, 2**b - 1], and a narrow range drops the lowest code.
QUANT_RANGES = [
    pytest.param(True, False, 2, -2, 1, id="int2"),
    pytest.param(True, False, 4, -8, 7, id="int4"),
    pytest.param(True, False, 8, -128, 127, id="int8"),
    pytest.param(True, False, 16, -32768, 32767, id="int16"),
    pytest.param(True, True, 2, -1, 1, id="int2-narrow"),
    pytest.param(True, True, 4, -7, 7, id="int4-narrow"),
    pytest.param(True, True, 8, -127, 127, id="int8-narrow"),
    pytest.param(True, True, 16, -32767, 32767, id="int16-narrow"),
    pytest.param(False, False, 2, 0, 3, id="uint2"),
    pytest.param(False, False, 4, 0, 15, id="uint4"),
    pytest.param(False, False, 8, 0, 255, id="uint8"),
    pytest.param(False, False, 16, 0, 65535, id="uint16"),
    pytest.param(False, True, 2, 1, 3, id="uint2-narrow"),
    pytest.param(False, True, 4, 1, 15, id="uint4-narrow"),
    pytest.param(False, True, 8, 1, 255, id="uint8-narrow"),
    pytest.param(False, True, 16, 1, 65535, id="uint16-narrow"),
]


@pytest.mark.parametrize(("signed", "narrow", "bits", "quant_min", "quant_max"), QUANT_RANGES)
def test_quant_range_derived(
    signed: bool, narrow: bool, bits: int, quant_min: int, quant_max: int
) -> None:
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)

    assert spec.quant_min == quant_min
    assert spec.quant_max == quant_max


@pytest.mark.parametrize("name", ["quant_min", "quant_max"])
def test_quant_range_not_a_constructor_argument(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        QuantSpec(**{name: 0})


def test_quantspec_frozen() -> None:
    spec = QuantSpec()

    with pytest.raises(attrs.exceptions.FrozenInstanceError, match="can't set attribute"):
        spec.bits = 4  # type: ignore[misc]
    assert spec.bits == 8


def test_quantspec_evolve_makes_new_spec() -> None:
    spec = QuantSpec(bits=8, signed=True)

    evolved = attrs.evolve(spec, bits=4, narrow_range=True)

    assert evolved.bits == 4
    assert (evolved.quant_min, evolved.quant_max) == (-7, 7)
    assert spec.bits == 8
    assert (spec.quant_min, spec.quant_max) == (-128, 127)


def test_quantspec_evolve_validates() -> None:
    with pytest.raises(ValueError, match=r"QuantSpec\.bits must be between 2 and 16, got 1"):
        attrs.evolve(QuantSpec(), bits=1)


def test_quantspec_equal_and_hashable_by_value() -> None:
    first = QuantSpec(bits=4, axis=0, observer_options={"averaging_constant": 0.01})
    second = QuantSpec(bits=4, axis=0, observer_options={"averaging_constant": 0.01})

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    assert {first: "weight"}[second] == "weight"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"bits": 4}, id="bits"),
        pytest.param({"signed": False}, id="signed"),
        pytest.param({"symmetric": False}, id="symmetric"),
        pytest.param({"axis": 0}, id="axis"),
        pytest.param({"narrow_range": True}, id="narrow_range"),
        pytest.param({"observer": "minmax"}, id="observer"),
        pytest.param({"observer_options": {"averaging_constant": 0.1}}, id="observer_options"),
        pytest.param({"kernel": "reference"}, id="kernel"),
    ],
)
def test_quantspec_unequal_when_field_differs(change: dict[str, object]) -> None:
    assert QuantSpec(**change) != QuantSpec()


def test_observer_options_immutable() -> None:
    spec = QuantSpec(observer_options={"averaging_constant": 0.01})

    with pytest.raises(TypeError, match="does not support item assignment"):
        spec.observer_options["averaging_constant"] = 0.5  # type: ignore[index]
    assert spec.observer_options["averaging_constant"] == 0.01


def test_observer_options_copied_from_caller() -> None:
    options = {"averaging_constant": 0.01}
    spec = QuantSpec(observer_options=options)

    options["averaging_constant"] = 0.5
    options["extra"] = 1

    assert dict(spec.observer_options) == {"averaging_constant": 0.01}


@pytest.mark.parametrize(
    "round_trip",
    [
        pytest.param(lambda spec: pickle.loads(pickle.dumps(spec)), id="pickle"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(copy.copy, id="copy"),
    ],
)
def test_quantspec_round_trip(round_trip) -> None:  # type: ignore[no-untyped-def]
    spec = QuantSpec(
        bits=4,
        signed=False,
        axis=1,
        narrow_range=True,
        observer="minmax",
        observer_options={"averaging_constant": 0.01},
        kernel="reference",
    )

    restored = round_trip(spec)

    assert restored == spec
    assert hash(restored) == hash(spec)
    assert (restored.quant_min, restored.quant_max) == (1, 15)
    with pytest.raises(TypeError, match="does not support item assignment"):
        restored.observer_options["averaging_constant"] = 0.5
    with pytest.raises(attrs.exceptions.FrozenInstanceError, match="can't set attribute"):
        restored.bits = 8


@pytest.mark.parametrize("field", ["weight", "activation"])
@pytest.mark.parametrize(
    "spec",
    [pytest.param(None, id="none"), pytest.param(QuantSpec(bits=4), id="quantspec")],
)
def test_qconfig_accepts_spec_or_none(field: str, spec: QuantSpec | None) -> None:
    qconfig = QConfig(**{field: spec})

    assert getattr(qconfig, field) == spec


@pytest.mark.parametrize("field", ["weight", "activation"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("int8", id="str"),
        pytest.param({"bits": 8}, id="dict"),
        pytest.param(8, id="int"),
        pytest.param(QConfig(), id="qconfig"),
    ],
)
def test_qconfig_rejects_non_spec(field: str, value: object) -> None:
    with pytest.raises(
        ValueError, match=rf"QConfig\.{field} must be a QuantSpec or None"
    ) as excinfo:
        QConfig(**{field: value})

    assert repr(value) in str(excinfo.value)


def test_qconfig_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        QConfig(QuantSpec(), QuantSpec())  # type: ignore[misc]


def test_qconfig_frozen_and_hashable() -> None:
    qconfig = QConfig(weight=QuantSpec(axis=0), activation=QuantSpec(signed=False))
    same = QConfig(weight=QuantSpec(axis=0), activation=QuantSpec(signed=False))

    with pytest.raises(attrs.exceptions.FrozenInstanceError, match="can't set attribute"):
        qconfig.weight = None  # type: ignore[misc]
    assert qconfig == same
    assert hash(qconfig) == hash(same)
    assert qconfig != QConfig(weight=QuantSpec(axis=0))
    assert pickle.loads(pickle.dumps(qconfig)) == qconfig


def test_quantspec_accepts_numpy_integers() -> None:
    numpy = pytest.importorskip("numpy")

    spec = QuantSpec(bits=numpy.int64(4), axis=numpy.int32(1))

    assert spec.bits == 4
    assert type(spec.bits) is int
    assert spec.axis == 1
    assert type(spec.axis) is int
