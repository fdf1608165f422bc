"""The target interface and registry of the kernel generator.

A target turns a :class:`~iqk_jax.registry.TypeDescriptor` into kernels. Each one is a small
emitter module (``iqk_codegen.xla``, ``iqk_codegen.pallas``, ``iqk_codegen.llvm``) exposing
``available()``, ``emit(desc, kernel)``, ``dequantize(raw, desc, shape, dtype)`` and
``matmul(x2d, raw, desc, shape)``; :class:`Target` binds a name to such a module, imported
lazily so that a target whose dependencies are missing or broken (llvmlite failing to
initialise, say) simply reports itself unavailable instead of breaking the import of the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from types import ModuleType

import jax

KERNELS = ("dequant", "gemv", "gemm")
ENV_VAR = "IQK_JAX_TARGET"


@dataclasses.dataclass(frozen=True)
class Target:
    """One code generation target.

    Attributes:
      name: the target's name (``xla``, ``pallas``, ``llvm``).
      module: the emitter module, imported on first use.
      kernels: the kernels ``emit`` can produce, a subset of :data:`KERNELS`.
      requires: further modules the runtime entry points import; the target is unavailable
        while any of them is missing (checked without importing them).
    """

    name: str
    module: str
    kernels: frozenset = frozenset(KERNELS)
    requires: tuple[str, ...] = ()

    def _load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def available(self) -> bool:
        """Whether the target can run in this process; never raises."""
        try:
            if any(importlib.util.find_spec(m) is None for m in self.requires):
                return False
            return bool(self._load().available())
        except Exception:  # ImportError, llvmlite initialisation errors, ...: not available
            return False

    def _require(self) -> ModuleType:
        if not self.available():
            raise RuntimeError(f"target {self.name!r} is not available in this environment "
                               f"(module {self.module})")
        return self._load()

    def emit(self, desc, kernel: str) -> str:
        """Kernel source text for ``desc`` (deterministic)."""
        if kernel not in self.kernels:
            raise ValueError(f"target {self.name!r} has no kernel {kernel!r}; "
                             f"it has {sorted(self.kernels)}")
        return self._require().emit(desc, kernel)

    def dequantize(self, raw, desc, shape, dtype):
        return self._require().dequantize(raw, desc, shape, dtype)

    def matmul(self, x2d, raw, desc, shape):
        return self._require().matmul(x2d, raw, desc, shape)


_TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Adds a target; names are unique."""
    if target.name in _TARGETS:
        raise ValueError(f"target {target.name!r} is already registered")
    if not set(target.kernels) <= set(KERNELS):
        raise ValueError(f"target {target.name!r}: kernels must be a subset of {KERNELS}")
    _TARGETS[target.name] = target
    return target


register(Target("xla", "iqk_codegen.xla"))
register(Target("pallas", "iqk_codegen.pallas"))
register(Target("llvm", "iqk_codegen.llvm", requires=("iqk_jax.cpu.runtime",)))


def names() -> tuple[str, ...]:
    """All registered target names, available or not."""
    return tuple(_TARGETS)


def get(name: str) -> Target:
    """The target called ``name``."""
    try:
        return _TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(_TARGETS)}") from None


def available() -> tuple[str, ...]:
    """Names of the targets that can run here."""
    return tuple(n for n, t in _TARGETS.items() if t.available())


def default(backend: str | None = None) -> str:
    """The default target for a JAX backend: llvm (else xla) on CPU, pallas (else xla) elsewhere."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        order = ("llvm", "xla")
    else:
        order = ("pallas", "xla")
    for n in order:
        if get(n).available():
            return n
    return "xla"


def resolve(name: str | None = None, backend: str | None = None) -> Target:
    """Picks a target: ``name`` if given, else ``$IQK_JAX_TARGET``, else :func:`default`.

    ``auto`` (argument or environment) means :func:`default`.

    Raises:
      ValueError: an unknown name (the environment variable is named in the message).
      RuntimeError: the requested target is not available here.
    """
    source = "target"
    if name is None:
        name = os.environ.get(ENV_VAR) or "auto"
        source = ENV_VAR
    name = name.strip().lower()
    if name == "auto":
        name = default(backend)
    if name not in _TARGETS:
        raise ValueError(f"{source}={name!r} is not a known target; expected one of "
                         f"{', '.join(_TARGETS)} or auto")
    t = _TARGETS[name]
    if not t.available():
        raise RuntimeError(f"{source}={name!r}: target {name!r} is not available in this "
                           f"environment")
    return t
