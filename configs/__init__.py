"""Experiment configs, one `get_config(arg)` per file (ml_collections, big_vision style).

`--config=configs/<name>.py[:arg]` loads a file by path; a config built on another
imports it as `from configs import <name>`, which finds this package because
`python -m restem_jax.main` puts the current directory (the repo root) on sys.path
(elsewhere: PYTHONPATH=<repo root>).
"""
