"""The parameter table of every quantization mode: valid group sizes and bit widths, defaults, scale kind.

This is the one place that says which (mode, group_size, bits) combinations exist (MLX 0.32.4's table).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSpec:
    name: str
    group_sizes: tuple[int, ...]
    bits: tuple[int, ...]
    default_group_size: int
    default_bits: int
    scale_format: str  # "float" (w's dtype), "e8m0" or "e4m3" (one uint8 per group)
    has_biases: bool


MODES: dict[str, ModeSpec] = {
    "affine": ModeSpec("affine", (32, 64, 128), (1, 2, 3, 4, 5, 6, 8), 64, 4, "float", True),
    "mxfp4": ModeSpec("mxfp4", (32,), (4,), 32, 4, "e8m0", False),
    "mxfp8": ModeSpec("mxfp8", (32,), (8,), 32, 8, "e8m0", False),
    "nvfp4": ModeSpec("nvfp4", (16,), (4,), 16, 4, "e4m3", False),
}


def mode_spec(op: str, mode: str) -> ModeSpec:
    """The spec of `mode`, or a ValueError naming `op` and the valid modes."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"[{op}] Invalid quantization mode {mode!r}; expected one of {', '.join(MODES)}.")
    return MODES[mode]


def resolve_params(op: str, mode: str, group_size: int | None, bits: int | None) -> tuple[ModeSpec, int, int]:
    """Fill in the mode's defaults and check (group_size, bits) against the table, as MLX does."""
    spec = mode_spec(op, mode)
    gs = spec.default_group_size if group_size is None else group_size
    b = spec.default_bits if bits is None else bits
    if not isinstance(gs, int) or isinstance(gs, bool) or gs not in spec.group_sizes:
        allowed = " or ".join(map(str, spec.group_sizes))
        raise ValueError(f"[{op}] {mode} quantization requires group size {allowed} but got {gs!r}.")
    if not isinstance(b, int) or isinstance(b, bool) or b not in spec.bits:
        allowed = ", ".join(map(str, spec.bits))
        raise ValueError(f"[{op}] {mode} quantization requires bits in {{{allowed}}} but got {b!r}.")
    return spec, gs, b


def bits_per_weight(mode: str, group_size: int, bits: int, scale_bytes: int = 2) -> float:
    """Storage cost per weight: payload bits plus the amortized group metadata (affine: scale and bias)."""
    spec = MODES[mode]
    meta_bits = 2 * 8 * scale_bytes if spec.has_biases else 8
    return bits + meta_bits / group_size
