"""launch/ command construction (no cloud, no network) and the configs in configs/."""
import dataclasses
import glob
import inspect
import json
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import load_config
from launch import commands, xm_launch
from restem_jax import model, partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOME = "cd ~/restem-jax && "


def _spec(**kw):
  base = dict(config="configs/llama3_1b_math_v4_32.py:bucket=gs://b", workdir="gs://b/w",
              tpu_name="tpu1", zone="us-central2-b", project="proj", accelerator_type="v4-32",
              repo_url="https://github.com/o/restem-jax")
  base.update(kw)
  return commands.LaunchSpec(**base)


@pytest.mark.parametrize("accel, chips, hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5p-128", 64, 16), ("v5litepod-8", 8, 1),
    ("v6e-16", 16, 4), ("v3-8", 4, 1)])
def test_tpu_topology(accel, chips, hosts):
  assert commands.tpu_topology(accel) == commands.Topology(chips, hosts)


def test_tpu_vm_plan_exact_commands_repo():
  plan = commands.tpu_vm_plan(_spec(), create=True)
  gc = ["gcloud", "compute", "tpus", "tpu-vm"]
  loc = ["--zone=us-central2-b", "--project=proj"]
  setup = ("set -e && cd ~ && if [ -d restem-jax/.git ]; then git -C restem-jax fetch -q "
           "--depth 1 origin main && git -C restem-jax checkout -q -B main FETCH_HEAD; else git "
           "clone -q --depth 1 --branch main https://github.com/o/restem-jax restem-jax; fi && "
           "cd restem-jax && (command -v uv >/dev/null || python3 -m pip install -q --user uv) "
           "&& export PATH=\"$HOME/.local/bin:$PATH\" && (test -x .venv/bin/python || uv venv "
           "-q --python 3.11 .venv) && uv pip install -q --python .venv/bin/python -e '.[tpu]'")
  run = (HOME + ".venv/bin/python -m restem_jax.main "
         "--config=configs/llama3_1b_math_v4_32.py:bucket=gs://b --workdir=gs://b/w "
         "--config.distributed.initialize=always")
  assert plan == [
      gc + ["create", "tpu1"] + loc + ["--accelerator-type=v4-32",
                                       "--version=tpu-ubuntu2204-base"],
      gc + ["ssh", "tpu1"] + loc + ["--worker=all", "--command=" + setup],
      gc + ["ssh", "tpu1"] + loc + ["--worker=all", "--command=" + run],
  ]


def test_overrides_env_quoting_and_tarball():
  spec = _spec(repo_url="", tarball="/tmp/r.tgz", accelerator_type="v5p-128",
               overrides=["task.data_dir=/data/my MATH", "--config.train.learning_rate=1e-5",
                          "config.sampling.top_k=40", "mesh.shape=(4,8,2)",
                          "task.vocab_path=it's.json", "distributed.initialize=auto"],
               extra_env={"XLA_FLAGS": "--a=1 --b", "TPU_STDERR_LOG_LEVEL": "0"})
  plan = commands.tpu_vm_plan(spec)
  assert plan[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/r.tgz",
                     "tpu1:restem-jax.tar.gz", "--zone=us-central2-b", "--project=proj",
                     "--worker=all"]
  assert "rm -rf restem-jax && mkdir -p restem-jax && tar -xzf restem-jax.tar.gz -C restem-jax" \
      in plan[1][-1]
  run = plan[2][-1].removeprefix("--command=")
  assert run == (
      HOME + "export TPU_STDERR_LOG_LEVEL=0; export XLA_FLAGS='--a=1 --b'; "
      ".venv/bin/python -m restem_jax.main "
      "--config=configs/llama3_1b_math_v4_32.py:bucket=gs://b --workdir=gs://b/w "
      "'--config.task.data_dir=/data/my MATH' --config.train.learning_rate=1e-5 "
      "--config.sampling.top_k=40 '--config.mesh.shape=(4,8,2)' "
      "'--config.task.vocab_path=it'\"'\"'s.json' --config.distributed.initialize=auto")
  # The remote shell sees exactly the intended argv (an explicit initialize wins).
  argv = shlex.split(run.split("; ")[-1])
  assert "--config.task.data_dir=/data/my MATH" in argv
  assert "--config.task.vocab_path=it's.json" in argv
  assert argv.count("--config.distributed.initialize=auto") == 1
  assert not any(a.endswith("=always") for a in argv)


def test_single_host_local_workdir_and_detach():
  spec = _spec(accelerator_type="v4-8", workdir="/tmp/w", detach=True, config="configs/demo.py")
  run = commands.run_command(spec)
  inner = (HOME + ".venv/bin/python -m restem_jax.main --config=configs/demo.py "
           "--workdir=/tmp/w")
  assert run == f"nohup bash -c {shlex.quote(inner)} < /dev/null > ~/restem-jax.log 2>&1 &"


@pytest.mark.parametrize("kw, msg", [
    (dict(tpu_name=""), "--tpu_name"),
    (dict(workdir="", zone=""), "--workdir, --zone"),
    (dict(tarball="/x.tgz"), "exactly one code source"),
    (dict(workdir="/local/dir"), "gs://"),
    (dict(overrides=["train.steps"]), "key.path=value"),
    (dict(accelerator_type="v9-8"), "unknown accelerator type"),
])
def test_missing_or_bad_args(kw, msg):
  with pytest.raises(commands.LaunchError, match=msg.replace("(", r"\(")):
    commands.tpu_vm_plan(_spec(**kw))


def _run_cli(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)


def test_tpu_vm_cli_dry_run_and_missing_arg():
  r = _run_cli("launch.tpu_vm", "--dry_run", "--tpu_name=t", "--zone=z", "--project=p",
               "--accelerator_type=v4-32", "--repo_url=u", "--config=configs/demo.py",
               "--workdir=gs://b/w", "--override=task.data_dir=/a b", "--skip_setup")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1  # --skip_setup: the run only
  assert shlex.split(lines[0]) == commands.ssh_argv(
      _spec(config="configs/demo.py", overrides=["task.data_dir=/a b"], zone="z", project="p",
            tpu_name="t", repo_url="u"),
      HOME + ".venv/bin/python -m restem_jax.main --config=configs/demo.py --workdir=gs://b/w "
      "'--config.task.data_dir=/a b' --config.distributed.initialize=always")
  r = _run_cli("launch.tpu_vm", "--dry_run", "--config=configs/demo.py", "--workdir=gs://b/w")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "tpu_vm: missing required launch argument(s): --tpu_name, --zone, --project")


def test_xm_dry_run_spec():
  spec = commands.LaunchSpec(config="configs/demo.py", workdir="gs://b/w",
                             overrides=["sampling.num_samples=4"], extra_env={"A": "1"})
  job = xm_launch.job_spec(spec, executor="vertex", accelerator="A100=8", path="/src/restem-jax")
  assert job == {
      "title": "restem-jax",
      "executable": {
          "type": "python_container", "path": "/src/restem-jax", "base_image": "python:3.11",
          "docker_instructions": ["COPY restem-jax/ /restem-jax", "WORKDIR /restem-jax",
                                  "RUN python3 -m pip install -q -e '.[gpu]'"],
          "entrypoint": ["python3 -m restem_jax.main --config=configs/demo.py --workdir=gs://b/w "
                         "--config.sampling.num_samples=4"],
      },
      "executor": {"type": "vertex", "requirements": {"a100": 8}},
      "env_vars": {"A": "1"},
  }
  assert "xmanager" not in sys.modules  # the dry run never imports it
  r = _run_cli("launch.xm_launch", "--dry_run", "--config=configs/demo.py", "--workdir=gs://b/w",
               "--accelerator=tpu_v3=8")
  assert r.returncode == 0, r.stderr
  cli = json.loads(r.stdout)
  assert cli["executor"] == {"type": "vertex", "requirements": {"tpu_v3": 8}}
  assert "'.[tpu]'" in cli["executable"]["docker_instructions"][-1]
  r = _run_cli("launch.xm_launch", "--dry_run", "--workdir=gs://b/w")
  assert r.returncode == 1 and "--config" in r.stderr


# --- configs/ ---

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))
# name -> (accelerator type, mesh devices, known parameter count).
POD_CONFIGS = {
    "llama3_1b_math_v4_32": ("v4-32", 16, 1.24e9),
    "llama3_8b_math_v5p_128": ("v5p-128", 64, 8.03e9),
    # Gemma 3 report, Table 1: 4B = 675M embedding + 3,209M non-embedding (+ the 417M
    # vision encoder, not imported).
    "gemma3_4b_math_v5p_32": ("v5p-32", 16, 3.884e9),
}

# The config.json each pod config's documented import reads (the Hub files' model keys;
# transformers omits keys equal to its config class's defaults, as Gemma 3 4B's
# text_config does). The importer maps them to a ModelConfig; the pod config must equal
# it but for the fields a run chooses (model.RUN_FIELDS).
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
           "mlp_bias": False, "hidden_act": "silu", "max_position_embeddings": 131072,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
           "rope_theta": 500000.0, "vocab_size": 128256, "bos_token_id": 128000,
           "eos_token_id": 128001}
REAL_CONFIG_JSON = {
    "llama3_1b_math_v4_32": {  # meta-llama/Llama-3.2-1B
        **_LLAMA3, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "llama3_8b_math_v5p_128": {  # meta-llama/Llama-3.1-8B
        **_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "gemma3_4b_math_v5p_32": {  # google/gemma-3-4b-pt (vision_config left out)
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024}},
}


def _config_args(mod):
  """Which get_config args a config file supports: its VARIANTS, else None (+ runlocal)."""
  if hasattr(mod, "VARIANTS"):
    return list(mod.VARIANTS)
  args = [None]
  if "runlocal" in inspect.getsource(mod) and inspect.signature(mod.get_config).parameters:
    args.append("runlocal")
  return args


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_model_builds(path):
  mod = load_config(path)
  for arg in _config_args(mod):
    cfg = mod.get_config(arg) if arg is not None else mod.get_config()
    mcfg = model.ModelConfig.from_config(cfg.model)
    assert mcfg.n_heads % mcfg.n_kv_heads == 0
    if arg == "runlocal":  # must run on a CPU with whatever device count
      assert tuple(cfg.mesh.shape) == (-1, 1, 1), path
      assert mcfg.d_model <= 256 and cfg.model.vocab_size <= 4096


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_config_fits_its_slice(name):
  accel, devices, known = POD_CONFIGS[name]
  mod = load_config(os.path.join(ROOT, "configs", name + ".py"))
  cfg = mod.get_config("bucket=gs://b")
  assert cfg.base.path == f"gs://b/restem/{mod.NAME}/base"
  assert cfg.base.source == "checkpoint" and cfg.task.name == "math"
  assert cfg.distributed.initialize == "always"
  assert commands.tpu_topology(accel).chips == devices
  shape = tuple(cfg.mesh.shape)
  assert -1 not in shape and int(np.prod(shape)) == devices
  mcfg = model.ModelConfig.from_config(cfg.model)
  data, fsdp, tensor = shape
  for value in (mcfg.n_heads, mcfg.n_kv_heads, mcfg.d_ff, mcfg.vocab_size):
    assert value % tensor == 0, (name, value, tensor)
  assert mcfg.d_model % fsdp == 0
  # Batches split over (data, fsdp): the configured sizes must divide evenly.
  for batch in (cfg.train.batch_size, cfg.sampling.max_batch):
    assert batch % (data * fsdp) == 0, (name, batch)
  # The repo's own check, on a stand-in object carrying the mesh's axis sizes.
  fake_mesh = type("M", (), {"shape": {"data": data, "fsdp": fsdp, "tensor": tensor}})()
  partitioning.check_model_fits_mesh(mcfg, fake_mesh)
  # Parameter count from shapes only (jax.eval_shape: nothing allocated).
  n = sum(int(np.prod(x.value.shape if hasattr(x, "value") else x.shape))
          for x in jax.tree.leaves(model.abstract_params(mcfg),
                                   is_leaf=lambda x: hasattr(x, "names")))
  assert abs(n - known) / known < 0.05, (name, n)
  assert cfg.model.dtype == "bfloat16"
  # The runlocal variant keeps the pod run's algorithm settings.
  local = mod.get_config("runlocal")
  assert local.train.optimizer == cfg.train.optimizer
  assert local.sampling.temperature == cfg.sampling.temperature == 0.7
  assert local.sampling.top_k == cfg.sampling.top_k == 40
  assert local.restem.max_per_problem == cfg.restem.max_per_problem == 10


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_config_is_the_model_its_import_reads(name):
  """What the documented `python -m restem_jax.importers --format=hf` makes of the
  model's config.json equals the pod config's model; a run's base checkpoint check
  (checkpoints.check_model_config) passes on it and names a field that differs."""
  from restem_jax.importers import hf  # pylint: disable=import-outside-toplevel
  mod = load_config(os.path.join(ROOT, "configs", name + ".py"))
  cfg = model.ModelConfig.from_config(mod.get_config("bucket=gs://b").model)
  imported = hf.model_config_from_hf(REAL_CONFIG_JSON[name])  # the CLI's defaults
  assert model.config_mismatches(imported, cfg, ignore=model.RUN_FIELDS) == ""
  assert imported.max_seq_len == cfg.max_seq_len == 2048
  # The field this issue found wrong: without the RoPE scaling the run stops, naming it.
  plain = dataclasses.replace(cfg, rope_scaling="none")
  assert model.config_mismatches(imported, plain, ignore=model.RUN_FIELDS) == (
      f"model.rope_scaling='none' (checkpoint: {cfg.rope_scaling!r})")


_PARSE_FLAGS = """
import json
from absl import app, flags
from ml_collections import config_flags
_C = config_flags.DEFINE_config_file("config")
flags.DEFINE_string("workdir", "", "")
def main(_):
  c = _C.value
  print(json.dumps([flags.FLAGS.workdir, c.base.path, c.task.data_dir, list(c.mesh.shape),
                    c.distributed.initialize, c.train.learning_rate]))
app.run(main)
"""


def test_generated_flags_parse_with_config_flags():
  """What the launchers emit is what restem_jax.main's config_flags accepts."""
  spec = _spec(overrides=["task.data_dir=/data/my MATH", "mesh.shape=(2,8,1)",
                          "train.learning_rate=3e-5"])
  argv = commands.run_argv(spec, python=sys.executable)
  assert argv[1:3] == ["-m", "restem_jax.main"]
  r = subprocess.run([sys.executable, "-c", _PARSE_FLAGS] + argv[3:], cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout) == ["gs://b/w", "gs://b/restem/llama3_1b_math/base",
                                  "/data/my MATH", [2, 8, 1], "always", 3e-5]
