"""The command-line programs beside train.py / sample.py / evaluate.py: argument parsing,
file reading and writing, and the wiring of the library's layers (the top layer; see
tests/test_layering.py). `python -m cm_jax.cli.cm_search`; `sample.py --edit` is
cm_jax.cli.editing."""
