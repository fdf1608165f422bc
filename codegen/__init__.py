"""The kernel generator: one emitter module per target, driven by type descriptors."""
