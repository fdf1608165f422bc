"""CPU runtime of the ``llvm`` target: JIT compilation, FFI registration, threading.

The kernels themselves are emitted by :mod:`iqk_codegen.llvm`; this package compiles them with
llvmlite for the host CPU, keeps the compiled code alive, registers each handler with XLA and
offers the jax-level calls.
"""
