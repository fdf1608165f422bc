"""Command-line tools (absl)."""
