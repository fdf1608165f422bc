"""``iqk-codegen``: list the IQK types and emit kernel source for a target.

Usage::

    iqk-codegen list
    iqk-codegen emit --type=iq4_k --target=pallas --kernel=gemv [--out=FILE]

``emit`` writes the target's source text: StableHLO for ``xla``, the ``pallas_call`` jaxpr for
``pallas``, LLVM IR for ``llvm``. The text is deterministic (same type, target and kernel give
the same bytes), so it can be diffed and checked in.
"""

from __future__ import annotations

import sys

from absl import app, flags

from iqk_jax import registry

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI's flags at run time, so importing this module never collides with another
    absl tool's flags (iqk-quantize also has --type)."""
    flags.DEFINE_string("type", None, "IQK type name, e.g. iq4_k (emit)")
    flags.DEFINE_string("target", "xla", "xla | pallas | llvm (emit)")
    flags.DEFINE_string("kernel", "dequant", "dequant | gemv | gemm (emit)")
    flags.DEFINE_string("out", None, "output file (emit); stdout when omitted")

COMMANDS = ("list", "emit")


def list_text() -> str:
    """The registry as a table: name, ggml id, bits, block size, grids, bits per weight."""
    lines = [f"{'name':<9} {'id':>4} {'bits':>4} {'block':>5} {'grids':>5} {'bpw':>7}"]
    for name in registry.types():
        d = registry.descriptor(name)
        grids = "trellis" if d.trellis is not None else str(len(d.grids))
        lines.append(f"{name:<9} {d.ggml_type:>4} {d.bits:>4} {d.block_size:>5} {grids:>5} "
                     f"{d.bpw:>7.4f}")
    return "\n".join(lines) + "\n"


def emit_text(type_name: str, target: str, kernel: str) -> str:
    """Kernel source for ``type_name`` on ``target``.

    Raises:
      ValueError: unknown type, target or kernel.
      RuntimeError: the target is not available here (e.g. llvm without llvmlite).
    """
    from iqk_codegen import targets
    desc = registry.descriptor(type_name)
    t = targets.get(target)
    if not t.available():
        raise RuntimeError(f"target {target!r} is not available in this environment; "
                           f"available: {', '.join(targets.available())}")
    text = t.emit(desc, kernel)
    return text if text.endswith("\n") else text + "\n"


def main(argv) -> int:
    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        raise app.UsageError(f"expected one command out of {', '.join(COMMANDS)}, got {args}")
    if args[0] == "list":
        sys.stdout.write(list_text())
        return 0
    if not FLAGS.type:
        raise app.UsageError("emit needs --type (one of: " + ", ".join(registry.types()) + ")")
    try:
        text = emit_text(FLAGS.type, FLAGS.target, FLAGS.kernel)
    except (ValueError, RuntimeError) as e:
        sys.stderr.write(f"iqk-codegen: error: {e}\n")
        return 2
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def run():
    """Console entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
