"""Config checks: every bad value fails up front, in one line naming the field.

The table runs `python -m restem_jax.main --config=configs/tiny.py --config.X=...`
exactly as a user would; each entry breaks a different rule of preflight.check (configlib's value checks
and the data / file checks).
The runs go through a small process pool; each must end within 5 s of CPU time
of its own, and none may create the workdir: nothing may start before the check.
"""
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import threading
from typing import NamedTuple

import pytest

from conftest import ROOT, TINY_CONFIG, load_config, main_cmd, subprocess_env
from restem_jax import configlib, errors, preflight, tasks

# "Fails within 5 s" is measured as the process's own CPU time, which the other
# processes of a busy machine do not inflate (wall time there can be several
# times larger); the wall-clock limit only catches a hang.
CPU_LIMIT_S = 5
WALL_LIMIT_S = 120

# (flags, what stderr must name). One rule per row.
BAD = [
    # Choices.
    (["--config.train.optimizer=adamm"], "train.optimizer='adamm': use one of 'adamw', 'adafactor'"),
    (["--config.train.schedule=linear"], "train.schedule='linear'"),
    (["--config.train.loss_normalization=mean"], "train.loss_normalization='mean'"),
    (["--config.model.dtype=float8"], "model.dtype='float8'"),
    (["--config.model.param_dtype=int8"], "model.param_dtype='int8'"),
    (["--config.base.source=scratch"], "base.source='scratch'"),
    (["--config.restem.sample_from=other"], "restem.sample_from='other'"),
    (["--config.restem.finetune_from=last"], "restem.finetune_from='last'"),
    (["--config.distributed.initialize=sometimes"], "distributed.initialize='sometimes'"),
    (["--config.task.name=gsm9k"], "task.name='gsm9k': use one of 'embedded_arith'"),
    (["--config.task.prompt_format=plain"], "task.prompt_format='plain': use one of 'few_shot', 'chat'"),
    (["--config.task.prompt_format=chat"],
     "task.prompt_format='chat' needs a tokenizer with a stored chat template, but the "
     "vocabulary is the embedded SentencePiece model; set task.vocab_path"),
    # Ranges.
    (["--config.train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["--config.task.num_test=-1"], "task.num_test=-1: must be >= 0"),
    (["--config.sampling.temperature=-0.5"], "sampling.temperature=-0.5: must be >= 0"),
    (["--config.train.learning_rate=0"], "train.learning_rate=0.0: must be > 0"),
    (["--config.sampling.top_p=1.5"], "sampling.top_p=1.5: must be in [0, 1]"),
    (["--config.eval.top_p=-0.1"], "eval.top_p=-0.1: must be in [0, 1]"),
    # Between fields.
    (["--config.eval.pass_k=(1,8)"], "eval.pass_k=(1, 8): k=8 is not in [1, eval.num_samples=4]"),
    (["--config.eval.majority_k=8"], "eval.majority_k=8 > eval.num_samples=4"),
    (["--config.train.micro_batches=3"], "train.batch_size=16 must be a multiple of train.micro_batches=3"),
    (["--config.mesh.shape=(3,1,1)", "--config.base.batch_size=8"],
     "base.batch_size=8 must be a multiple of train.micro_batches=1 x the mesh's data-parallel size 3"),
    (["--config.sampling.max_new_tokens=96"], "sampling.max_new_tokens=96 leaves no room for a prompt"),
    (["--config.train.shared_row_len=50"], "train.shared_row_len=50 < model.max_seq_len=96"),
    # Model shape, mesh vs model.
    (["--config.model.n_kv_heads=3"], "model.n_heads=2 is not divisible by model.n_kv_heads=3"),
    (["--config.model.d_model=63"], "model.d_model=63 is not divisible by model.n_heads=2"),
    (["--config.model.head_dim=7"], "model.head_dim=7"),
    (["--config.mesh.shape=(-1,1,2)"], "model.n_kv_heads=1 is not divisible by the mesh's tensor axis (2)"),
    (["--config.mesh.shape=(-1,-1,1)"], "mesh.shape may contain at most one -1"),
    (["--config.mesh.shape=(0,1,1)"], "mesh.shape=(0, 1, 1): entries are device counts"),
    # Paths.
    (["--config.base.source=checkpoint"], "base.source='checkpoint' needs base.path"),
    (["--config.base.source=checkpoint", "--config.base.path=/nonexistent/base"],
     "base.path='/nonexistent/base' does not exist"),
    (["--config.restem.sample_from=teacher"], "restem.sample_from='teacher' needs restem.teacher_path"),
    (["--config.restem.sample_from=teacher", "--config.restem.teacher_path=/nonexistent/teacher"],
     "restem.teacher_path='/nonexistent/teacher' does not exist"),
    (["--config.task.name=gsm8k", "--config.task.data_dir=/nonexistent/gsm8k"],
     "task.data_dir: gsm8k: data_dir '/nonexistent/gsm8k' does not exist"),
    (["--config.task.name=math"], "task.data_dir: math: data_dir '' is not set"),
    (["--config.task.name=reasoning_gym", "--config.task.rg_datasets=(('chain_summ', 1.0, {}),)"],
     "task.rg_datasets[0]: unknown reasoning-gym dataset 'chain_summ'"),
    (["--config.task.name=reasoning_gym",
      "--config.task.rg_datasets=(('chain_sum', 1.0, {'min_terms': 5, 'max_terms': 2}),)"],
     "task.rg_datasets[0] (chain_sum): bad config"),
    (["--config.eval.transfer_tasks=({'name': 'embedded_arith', 'bogus': 1},)"],
     "eval.transfer_tasks[0] sets ['bogus'], which are not task fields"),
    (["--config.eval.transfer_tasks=({'name': 'gsm8k', 'data_dir': '/nonexistent/g'},)"],
     "eval.transfer_tasks[0].data_dir: gsm8k: data_dir"),
    (["--config.eval.transfer_tasks=({'label': 'a'}, {'label': 'a', 'max_steps': 2})"],
     "eval.transfer_tasks: labels ['a', 'a'] repeat"),
    (["--config.sampling.num_samples=8", "--config.sampling.max_batch=4"],
     "sampling.max_batch=4 < sampling.num_samples=8"),
    (["--config.eval.num_samples=8", "--config.eval.max_batch=4"],
     "eval.max_batch=4 (0 = sampling.max_batch) < eval.num_samples=8"),
    (["--config.eval.max_new_tokens=100000"], "eval.max_new_tokens=100000 leaves no room"),
    (["--config.task.vocab_path=/nonexistent/vocab.model"],
     "task.vocab_path='/nonexistent/vocab.model' does not exist"),
]


class Run(NamedTuple):
  returncode: int  # negative: killed (it outlived WALL_LIMIT_S)
  stderr: str
  cpu_s: float  # user + system seconds of the process itself


def _run_main(flags, workdir, cwd=ROOT, config=TINY_CONFIG, extra_env=None) -> Run:
  """One `python -m restem_jax.main` run, as a user types it."""
  env = {**subprocess_env(), **(extra_env or {})}
  with tempfile.TemporaryFile("w+") as err:
    p = subprocess.Popen(main_cmd(workdir, *flags, config=config), cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=err, text=True)
    timer = threading.Timer(WALL_LIMIT_S, p.kill)
    timer.start()
    try:
      _, status, usage = os.wait4(p.pid, 0)  # wait4: the child's own resource usage
    finally:
      timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    return Run(p.returncode, err.read(), usage.ru_utime + usage.ru_stime)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Every row of BAD through main, a few processes at a time: {row index: (process, workdir)}."""
  base = tmp_path_factory.mktemp("bad_configs")
  workdirs = [str(base / f"w{i}") for i in range(len(BAD))]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    procs = list(pool.map(lambda i: _run_main(BAD[i][0], workdirs[i]), range(len(BAD))))
  return {i: (p, w) for i, (p, w) in enumerate(zip(procs, workdirs))}


def test_table_has_one_row_per_rule():
  assert len(BAD) >= 25
  assert len({tuple(flags) for flags, _ in BAD}) == len(BAD)
  assert len({expect for _, expect in BAD}) == len(BAD)


@pytest.mark.parametrize("row", range(len(BAD)), ids=[" ".join(f) for f, _ in BAD])
def test_bad_config_fails_at_once_naming_the_field(bad_runs, row):
  flags, expect = BAD[row]
  p, workdir = bad_runs[row]
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert p.cpu_s < CPU_LIMIT_S, f"{flags}: {p.cpu_s:.1f} s of CPU before failing"
  lines = p.stderr.strip().splitlines()
  assert any(line.startswith("error: ") and expect in line for line in lines), p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert not os.path.exists(workdir)  # nothing was started, not even the workdir


def test_every_problem_is_reported_on_its_own_line(tmp_path):
  p = _run_main(["--config.train.optimizer=sgd", "--config.eval.top_p=2.0",
                 "--config.model.n_kv_heads=3"], str(tmp_path / "w"))
  assert p.returncode == 2, p.stderr
  errs = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(errs) == 3, errs
  for field in ("train.optimizer='sgd'", "eval.top_p=2.0", "model.n_kv_heads=3"):
    assert sum(field in line for line in errs) == 1, (field, errs)


def test_good_configs_pass_validate():
  configs = os.path.join(ROOT, "configs")
  preflight.check(load_config(TINY_CONFIG).get_config())
  demo = load_config(os.path.join(configs, "demo.py"))
  preflight.check(demo.get_config())
  preflight.check(demo.get_config("runlocal"))
  ablations = load_config(os.path.join(configs, "ablations.py"))
  for name in sorted(ablations.VARIANTS):
    if name != "distill":  # needs a teacher checkpoint: checked just below
      preflight.check(ablations.get_config(name))
  distill = ablations.get_config("distill")
  with pytest.raises(errors.ConfigError, match="needs restem.teacher_path"):
    preflight.check(distill)
  distill.restem.teacher_path = ROOT  # any existing directory: only its existence is checked
  preflight.check(distill)
  # The pod configs name gs:// paths of another machine: everything but the files.
  for name in ("llama3_1b_math_v4_32", "llama3_8b_math_v5p_128", "gemma3_4b_math_v5p_32"):
    mod = load_config(os.path.join(configs, name + ".py"))
    preflight.check(mod.get_config("bucket=gs://b"), check_files=False)
    preflight.check(mod.get_config("runlocal"))


def test_validate_reads_no_heavy_library():
  # Checking a config must not pay for JAX / SeqIO / TensorFlow (seconds to import).
  code = ("import sys; from restem_jax import preflight; import importlib.util as u; "
          f"s = u.spec_from_file_location('tiny', {TINY_CONFIG!r}); m = u.module_from_spec(s); "
          "s.loader.exec_module(m); preflight.check(m.get_config()); "
          "print(sorted({'jax', 'seqio', 'tensorflow'} & set(sys.modules)))")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == "[]"


def test_check_tables_name_real_fields_and_defaults_pass():
  c = configlib.default_config()
  for field in [*configlib.CHOICES, *configlib.AT_LEAST, *configlib.POSITIVE,
                *configlib.FRACTIONS]:
    section, name = field.split(".")
    assert name in c[section], field
  # The defaults satisfy every rule (task.name's registry and paths included).
  assert preflight.problems(c) == []
  assert configlib.problems(c) == []  # the value checks alone


def test_parse_config_arg():
  assert configlib.parse_config_arg("runlocal,bucket=gs://b", allowed=("runlocal", "bucket")) \
      == {"runlocal": "1", "bucket": "gs://b"}
  assert configlib.parse_config_arg(None, allowed=()) == {}
  with pytest.raises(errors.ConfigError, match=r"\['runlcoal'\].*takes runlocal"):
    configlib.parse_config_arg("runlcoal", allowed=("runlocal",))


def test_ablations_load_from_another_directory(tmp_path):
  # configs/ablations.py builds on the demo by import, not by file path: an absolute
  # --config works from any cwd (a bad override stops the run right after loading).
  cfg = os.path.join(ROOT, "configs", "ablations.py") + ":rest"
  p = _run_main(["--config.train.optimizer=x"], str(tmp_path / "w"), cwd=str(tmp_path),
                config=cfg, extra_env={"PYTHONPATH": ROOT})
  assert p.returncode == 2, p.stderr
  assert "error: train.optimizer='x'" in p.stderr


def test_configs_import_each_other_as_a_package(tmp_path):
  # gemma3_270m_rg -> `from configs import smollm2_135m_rg` -> `... smollm2_135m_gsm`, with
  # no sys.path edits: `python -m` from the repo root puts it on sys.path (no PYTHONPATH).
  env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
  proc = subprocess.run(main_cmd(str(tmp_path / "w"), "--config.train.optimizer=x",
                                 config="configs/gemma3_270m_rg.py:runlocal"),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=WALL_LIMIT_S)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: train.optimizer='x'" in proc.stderr, proc.stderr[-2000:]


def test_partitioning_still_exports_config_error():
  from restem_jax import partitioning  # pylint: disable=import-outside-toplevel
  assert partitioning.ConfigError is errors.ConfigError


@pytest.mark.parametrize("name", ["tiny", "demo", "smollm2_135m_gsm", "llama3_1b_math_v4_32",
                                  "llama3_8b_math_v5p_128", "gemma3_4b_math_v5p_32",
                                  "smollm2_135m_rg", "gemma3_270m_rg"])
def test_config_files_refuse_an_unknown_argument(name):
  # `file.py:arg` goes through configlib.parse_config_arg: a typo is an error, not ignored.
  mod = load_config(os.path.join(ROOT, "configs", name + ".py"))
  with pytest.raises(errors.ConfigError, match="runlcoal"):
    mod.get_config("runlcoal")


def test_saved_config_check_ignores_fields_added_at_their_default(tmp_path):
  # A workdir saved before a field existed resumes when the field is at its default
  # (workdir gets the defaults from its caller; it does not import configlib).
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "config.json")
  c = configlib.default_config()
  saved = json.loads(c.to_json_best_effort(sort_keys=True))
  del saved["train"]["shared_row_len"]  # as written by a version before the field
  with open(path, "w") as f:
    json.dump(saved, f)
  wd.check_or_save_config(path, c, override=False, write=False, defaults=c)
  with pytest.raises(wd.WorkdirError, match="train.shared_row_len"):
    wd.check_or_save_config(path, c, override=False, write=False)  # no defaults: a change
  changed = configlib.default_config()
  changed.unlock()
  changed.train.shared_row_len = 512
  with pytest.raises(wd.WorkdirError, match="config differs .* at train.shared_row_len"):
    wd.check_or_save_config(path, changed, override=False, write=False,
                            defaults=configlib.default_config())


def test_value_checks_read_nothing_preflight_reads_the_files():
  c = configlib.default_config()
  c.task.name, c.task.vocab_path = "gsm9k", "/nonexistent/vocab.model"
  assert configlib.problems(c) == []  # no registry, no paths: those are preflight's
  assert preflight.problems(c, check_files=False) == [
      "task.name='gsm9k': use one of " + ", ".join(map(repr, tasks.dataset_names()))]
  assert any(line.startswith("task.vocab_path='/nonexistent/vocab.model' does not exist")
             for line in preflight.problems(c))
