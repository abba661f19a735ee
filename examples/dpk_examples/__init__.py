"""What the example binaries, the research scripts and the benchmarks share, outside the library.

Offline data and pretrained weights (`datasets`, `presets`), text export helpers (`text`), one
training entry point per method (`recipes`), the tasks' tuned defaults (`tasks`) and the binaries'
common absl flags (`example_flags`). Not part of the `dp_bitfit_keras` wheel: run from a
checkout (`uv run python examples/...`), where `examples/` is on the path.
"""
