"""Target device profiles: one TOML per board in this folder (``tmlp devices list``), read into ``DeviceProfile``.

A profile says what the board's onnxruntime accepts (version, highest opset and IR version, execution providers)
and what the board is (arch, CPU, cores, memory, OS, Python, the qemu CPU model that emulates it). ``tmlp export
--device NAME`` writes a model within those limits; ``tmlp devices check NAME model.onnx`` runs it under emulation.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields
from typing import Any

from tmlp.errors import TmlpError

PROFILE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class DeviceProfile:
    """One board. ``memory_mb`` is the board's RAM in MiB; ``max_opset``/``max_ir_version`` the highest ONNX
    opset and IR version its onnxruntime reads; ``providers`` in priority order; ``qemu_cpu`` the qemu-user CPU
    model (None where the board is not emulated)."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    memory_mb: int
    os: str
    python: str
    onnxruntime: str
    max_opset: int
    max_ir_version: int
    providers: tuple[str, ...]
    default_threads: int
    qemu_cpu: str | None = None
    unsupported_ops: tuple[str, ...] = ()  # op types none of the board's providers (CPU fallback included) run

    def check_ops(self, op_types: set[str]) -> None:
        """Fail, naming them, if the graph uses ops this board cannot run."""
        bad = sorted(op_types & set(self.unsupported_ops))
        if bad:
            raise TmlpError(f"device {self.name} cannot run op(s) {', '.join(bad)} (unsupported_ops in its profile); "
                            "edit the profile if the board can, or choose another --device")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = list(self.providers)
        d["unsupported_ops"] = list(self.unsupported_ops)
        return d


def profile_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".toml"))


def parse_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    """A DeviceProfile from a TOML table; names the missing or mistyped field and the file."""
    types = {f.name: f.type for f in fields(DeviceProfile)}
    required = [f.name for f in fields(DeviceProfile) if f.name not in ("qemu_cpu", "unsupported_ops")]
    missing = [k for k in required if k not in data]
    if missing:
        raise TmlpError(f"device profile {source} lacks {', '.join(missing)}; add them (see devices/rpi4.toml)")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise TmlpError(f"device profile {source} has unknown field(s) {', '.join(unknown)}; the fields are "
                        f"{', '.join(types)}")
    for key in ("cores", "memory_mb", "max_opset", "max_ir_version", "default_threads"):
        if not isinstance(data[key], int) or data[key] < 1:
            raise TmlpError(f"device profile {source}: {key} must be a positive integer, got {data[key]!r}")
    if not isinstance(data["providers"], list) or not data["providers"]:
        raise TmlpError(f"device profile {source}: providers must be a non-empty list like [\"CPUExecutionProvider\"]")
    return DeviceProfile(**{**data, "providers": tuple(data["providers"]),
                            "unsupported_ops": tuple(data.get("unsupported_ops", ()))})


def load_profile(name_or_path: str) -> DeviceProfile:
    """The profile named ``name_or_path`` (a file in devices/) or read from a .toml path."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(PROFILE_DIR, f"{name_or_path}.toml")
    if not os.path.isfile(path):
        raise TmlpError(f"unknown device {name_or_path!r}; known: {', '.join(profile_names())} (or pass a .toml "
                        "path)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise TmlpError(f"device profile {path} is not valid TOML: {e}") from None
    return parse_profile(data, path)
