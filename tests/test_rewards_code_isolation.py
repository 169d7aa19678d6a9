"""Code sandbox, round three (issue 31): five escape classes, one or more programs each.

1. Signals to the trusted checker: a candidate's signals never change its verdict.
2. Files the checker opens after a candidate ran: none (a swapped-in FIFO is a FAIL,
   never a grader fault).
3. Socket families a network namespace does not isolate: only AF_UNIX / AF_INET /
   AF_INET6 sockets can be created (creation only: nothing here binds or connects
   anything but loopback inside the sandbox's own namespace).
4. Kernel socket memory: a program cannot hold more than the cap in socket buffers.
5. Page cache across samples: a program cannot tell whether an earlier program read
   a file outside the sandbox's read-only view.
Each test checks a side effect the host can see, or a verdict whose expected value
differs from what the attack, had it worked, would have produced.
"""
import ctypes
import errno
import mmap
import os
import shutil
import time

import pytest

from restem_jax.rewards import memcg, seccomp
from restem_jax.rewards import code as code_lib
from restem_jax.rewards.code import CodeExecutor, Limits

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap not installed (apt-get install bubblewrap)")

LIMITS = Limits(cpu_s=2, wall_s=3, memory_mb=256, max_procs=16, file_size_mb=1,
                open_files=64, max_output_kb=64, scratch_mb=16, sandbox_memory_mb=384)


@pytest.fixture(scope="module")
def ex():
  with CodeExecutor(LIMITS, num_workers=2) as executor:
    yield executor
    assert not executor.faults  # no attack here may cost a grader fault


def stdio(program, inputs, outputs):
  return {"kind": "stdio", "program": program, "inputs": inputs, "outputs": outputs}


def he(program, test, entry_point="f"):
  return {"kind": "humaneval", "program": program, "test": test, "entry_point": entry_point}


# ------------------------------------------------------------------ 1. signals

# Sends every signal (SIGKILL, SIGSTOP and SIGINT included) to the checker (pid 1,
# its parent) and to every process it may signal (-1), in a per-run order.
SIGNAL_ALL = ("import os, signal\n"
              "def signal_all(seed):\n"
              "    sigs = sorted(signal.valid_signals())\n"
              "    sigs = sigs[seed % len(sigs):] + sigs[:seed % len(sigs)]\n"
              "    sigs = sigs[::-1] if seed % 2 else sigs\n"
              "    for s in sigs:\n"
              "        for target in (1, os.getppid(), -1):\n"
              "            try:\n                os.kill(target, s)\n"
              "            except OSError:\n                pass\n")
RUNS = 100  # calls into one serve process
STDIO_RUNS = 10  # candidate processes of one stdio job (~0.1-0.2 s each on a loaded host)


def test_candidate_signals_never_change_the_verdict():
  # 100 calls into one serve process and 10 stdio runs (one candidate process
  # each), batched in two jobs, plus two wrong variants: the right answer
  # passes, a wrong one fails on its own test (not with KeyboardInterrupt, not
  # as a dead checker).
  squares = SIGNAL_ALL + "i = int(input())\nsignal_all(i)\nprint(i * i)\n"
  wrong_last = SIGNAL_ALL + "i = int(input())\nsignal_all(i)\nprint(i * i + (i == 4))\n"
  inputs, outputs = [str(i) for i in range(RUNS)], [str(i * i) for i in range(RUNS)]
  call = SIGNAL_ALL + "def f(i):\n    signal_all(i)\n    return i * i\n"
  check = f"def check(f):\n    for i in range({RUNS}):\n        assert f(i) == i * i, i\n"
  wrong_check = f"def check(f):\n    for i in range({RUNS}):\n        assert f(i) == i * i + (i == {RUNS - 1}), i\n"
  with CodeExecutor(Limits(wall_s=30), num_workers=2) as ex:  # 100 interpreters per job
    outs = ex.score_detailed([stdio(squares, inputs[:STDIO_RUNS], outputs[:STDIO_RUNS]),
                              stdio(wrong_last, inputs[:5], outputs[:5]),
                              he(call, check), he(call, wrong_check)])
    assert not ex.faults
  assert [o.reward for o in outs] == [1.0, 0.0, 1.0, 0.0], outs
  assert all(o.fault is None for o in outs), outs
  assert outs[1].reason.startswith("FAIL AssertionError: test 4: wrong output"), outs[1]
  assert outs[3].reason == f"FAIL AssertionError: {RUNS - 1}", outs[3]


def test_candidates_get_default_signal_handlers(ex):
  # The checker ignores signals; a candidate must not inherit that (an ignored
  # disposition survives exec): all default, bar the three Python itself sets.
  prog = ("import signal\n"
          "own = (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)\n"
          "odd = [int(s) for s in signal.valid_signals()\n"
          "       if s not in own and signal.getsignal(s) not in (signal.SIG_DFL, None)]\n"
          "print(odd, signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
  out = ex.score_detailed([stdio(prog, [""], ["[] True"])])[0]
  assert out.reward == 1.0, out


# ------------------------------------------------------------- 2. swapped files

# Each program replaces the stdio program file of round two (/tmp/main.py) and
# every other name in its cwd the checker could use, then prints `answer`.
SWAPS = {
    "fifo": "os.mkfifo(p)",
    "symlink_to_fifo": "os.mkfifo(p + '.q')\nos.symlink(p + '.q', p)",
    "directory": "os.mkdir(p)",
    "symlink_to_dev_zero": "os.symlink('/dev/zero', p)",
}


def _swapper(swap, answer):
  body = "\n".join("        " + ln for ln in swap.splitlines())
  return ("import os\n"
          "for p in ['/tmp/main.py', '/tmp/input', '/tmp/output', '/tmp/job.json']:\n"
          "    try:\n        os.unlink(p)\n    except OSError:\n        pass\n"
          f"    try:\n{body}\n    except FileExistsError:\n        pass\n"  # a second run
          f"print({answer!r})\n")


def test_file_swaps_are_the_programs_failure_never_a_fault(ex):
  faults_before = sum(ex.faults.values())
  names = sorted(SWAPS)
  jobs = [stdio(_swapper(SWAPS[n], "wrong"), ["", "", ""], ["right"] * 3) for n in names]
  jobs += [stdio(_swapper(SWAPS[n], "right"), ["", "", ""], ["right"] * 3) for n in names]
  outs = ex.score_detailed(jobs)
  wrong, right = outs[:len(names)], outs[len(names):]
  for name, out in zip(names, wrong):
    assert out.reward == 0.0 and out.fault is None, (name, out)
    assert out.reason.startswith("FAIL AssertionError: test 0: wrong output"), (name, out)
  # A right answer stays right: the swap touches nothing the grader reads.
  assert [o.reward for o in right] == [1.0] * len(names), right
  assert sum(ex.faults.values()) == faults_before


# ------------------------------------------------------------ 3. socket families

# linux/socket.h: AF_UNSPEC 0 .. AF_MCTP 45. Every family but these three is refused.
ALLOWED_FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6"}
SOCKET_TYPES = (1, 2, 3, 5)  # SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET
NR_SOCKET, NR_SOCKETPAIR = (seccomp.syscall_number(n) for n in ("socket", "socketpair"))
FAMILY_PROBE = (
    "import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def err(r):\n    e = ctypes.get_errno() if r < 0 else 0\n"
    "    if r >= 0:\n        os.close(r)\n    return e\n"
    "def f():\n    refused, created = {}, {}\n"
    "    for fam in range(46):\n"
    "        errs = set()\n"
    f"        for typ in {SOCKET_TYPES}:\n"
    f"            errs.add(err(libc.syscall({NR_SOCKET}, fam, typ, 0)))\n"
    "            fds = (ctypes.c_int * 2)(-1, -1)\n"
    f"            r = libc.syscall({NR_SOCKETPAIR}, fam, typ, 0, fds)\n"
    "            errs.add(ctypes.get_errno() if r < 0 else 0)\n"
    "            [os.close(fd) for fd in fds if r == 0]\n"  # (fds are filled in even on failure)
    f"        if fam in {set(ALLOWED_FAMILIES)}:\n"
    f"            created[fam] = err(libc.syscall({NR_SOCKET}, fam, 1, 0))\n"
    "        else:\n            refused[fam] = sorted(errs)\n"
    "    for name in ('AF_VSOCK', 'AF_NETLINK', 'AF_PACKET', 'AF_ALG'):\n"  # through Python too
    "        try:\n            socket.socket(getattr(socket, name), socket.SOCK_DGRAM).close()\n"
    "            refused[name] = [0]\n"
    "        except OSError as e:\n            refused[name] = [e.errno]\n"
    "    return [refused, created]\n")


def test_only_unix_and_ip_sockets_can_be_created(ex):
  want_refused = {fam: [errno.EAFNOSUPPORT] for fam in range(46) if fam not in ALLOWED_FAMILIES}
  want_refused |= {n: [errno.EAFNOSUPPORT] for n in ("AF_VSOCK", "AF_NETLINK", "AF_PACKET", "AF_ALG")}
  test = ("def check(f):\n    refused, created = f()\n"
          f"    want = {want_refused!r}\n"
          "    bad = {k: v for k, v in refused.items() if want.get(k) != v}\n"
          "    assert not bad and set(refused) == set(want), bad\n"
          f"    assert created == {dict.fromkeys(ALLOWED_FAMILIES, 0)!r}, created\n")
  out = ex.score_detailed([he(FAMILY_PROBE, test)])[0]
  assert out.reward == 1.0, out


# ----------------------------------------------------------- 4. socket memory

# f(n) opens n loopback TCP connections (in the sandbox's own network namespace),
# fills each one's buffers with a receiver that never reads, and returns the bytes
# the kernel accepted. Without a bound on socket memory, 28 connections hold
# ~330 MB on this kernel: more than the 256 MB cap below.
HOLD_SOCKETS = """
import socket, time
def f(n):
    S = socket.SOL_SOCKET
    lst = socket.socket()
    lst.setsockopt(S, socket.SO_RCVBUF, 1 << 23)
    lst.bind(('127.0.0.1', 0))
    lst.listen(64)
    held, keep, chunk = 0, [], b'x' * 65536
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(S, socket.SO_SNDBUF, 1 << 23)
        c.connect(lst.getsockname())
        keep += [c, lst.accept()[0]]
        c.setblocking(False)
        stalls = 0
        while stalls < 3:
            try:
                held += c.send(chunk)
                stalls = 0
            except BlockingIOError:
                stalls += 1
                time.sleep(0.01)
    return held
"""


def test_socket_buffers_count_against_the_cap():
  limits = Limits(cpu_s=4, wall_s=10, memory_mb=256, max_procs=16, open_files=64,
                  sandbox_memory_mb=256)
  with CodeExecutor(limits, num_workers=1) as solo:
    if not solo.memory_cgroup:
      pytest.skip("no memory cgroup can be created here (see the warning logged)")
    if not solo.socket_memory_charged:
      pytest.skip("this kernel does not charge socket buffers to a v1 memory cgroup")
    cap = limits.sandbox_memory_mb << 20
    group = solo._cgroups.dirs[0]
    if solo._cgroups.version == 1:
      with open(os.path.join(group, "memory.kmem.tcp.max_usage_in_bytes"), "w") as f:
        f.write("0")
    # The program does hold socket memory (> 1 MB), but never the cap's worth.
    out = solo.score_detailed([he(HOLD_SOCKETS, f"def check(f):\n    held = f(28)\n"
                                                f"    assert {1 << 20} < held < {cap}, held\n")])[0]
    assert out.reward == 1.0 and out.fault is None, out
    if solo._cgroups.version == 1:  # the kernel's own count: within the socket share
      with open(os.path.join(group, "memory.kmem.tcp.max_usage_in_bytes")) as f:
        tcp_peak = int(f.read())
      with open(os.path.join(group, "memory.kmem.tcp.limit_in_bytes")) as f:
        tcp_limit = int(f.read())
      with open(os.path.join(group, "memory.limit_in_bytes")) as f:
        rest_limit = int(f.read())
      # (the kernel charges a few pages past the limit rather than drop a packet)
      assert 0 < tcp_peak < 2 * tcp_limit and tcp_limit == cap // memcg.TCP_SHARE
      assert tcp_limit + rest_limit == cap


# -------------------------------------------------------------- 5. page cache

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _cached_on_host(path):
  """Whether page 0 of path is in the page cache: mincore(2) on a fresh mapping,
  which (unlike a RWF_NOWAIT read, the probe's method) starts no readahead."""
  fd = os.open(path, os.O_RDONLY)
  try:
    addr = _libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
      raise OSError(ctypes.get_errno(), "mmap")
    try:
      vec = ctypes.create_string_buffer(1)
      if _libc.mincore(addr, 4096, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
      return bool(vec.raw[0] & 1)
    finally:
      _libc.munmap(addr, 4096)
  finally:
    os.close(fd)


def _evict(path):
  """Drop path from the page cache (a probe's readahead may still be in flight: retry)."""
  for _ in range(50):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
    if not _cached_on_host(path):
      return
    time.sleep(0.02)
  pytest.skip(f"cannot evict {path} from the page cache here")


def _reader(path):
  return stdio(f"try:\n    open({path!r}, 'rb').read()\nexcept OSError:\n    pass\nprint(0)\n",
               [""], ["0"])


def _probe(path):  # prints 1 iff page 0 of path is in the page cache
  return stdio("import os\ntry:\n"
               f"    fd = os.open({path!r}, os.O_RDONLY)\n"
               "    os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)\n    print(1)\n"
               "except OSError:\n    print(0)\n", [""], ["1"])


def _probe_sees_earlier_read(ex, path):
  seen = []
  for earlier in (_reader(path), stdio("print(0)\n", [""], ["0"])):
    _evict(path)
    assert ex.score([earlier]) == [1.0]
    seen.append(ex.score([_probe(path)])[0])
  return seen[0] != seen[1]


def test_no_page_cache_trace_of_files_outside_the_view(ex):
  outside = "/usr/share/common-licenses/GPL-3"  # visible in round two's view (all of /usr)
  if not os.path.isfile(outside):
    pytest.skip(f"{outside} not on this host")
  assert outside not in code_lib._interpreter_view(ex.python)
  assert not _probe_sees_earlier_read(ex, outside)
  # Control, and the documented residual channel (docs/RELIABILITY.md): the same
  # probe does see an earlier read of a file inside the view, a stdlib module that
  # neither the checker nor a bare candidate imports.
  inside = os.path.join(os.path.dirname(shutil.__file__), "turtle.py")
  assert _probe_sees_earlier_read(ex, inside)


def test_memory_files_written_per_cgroup_version(tmp_path):
  """Which cgroup files carry the cap, on a directory standing in for each kind of
  kernel (this host can only run the v1 case for real, above)."""
  cap = 256 << 20

  def limits(version, kmem_tcp):
    groups = memcg.SlotCgroups(str(tmp_path / f"v{version}{kmem_tcp}"), version, 1)
    os.makedirs(groups.dirs[0])
    if not kmem_tcp:  # a v1 kernel without socket accounting: the file cannot be written
      os.mkdir(os.path.join(groups.dirs[0], "memory.kmem.tcp.limit_in_bytes"))
    groups._limit(groups.dirs[0], cap)
    files = {}
    for name in sorted(os.listdir(groups.dirs[0])):
      path = os.path.join(groups.dirs[0], name)
      if os.path.isfile(path):
        with open(path) as f:
          files[name] = int(f.read())
    return groups.socket_memory_charged, files

  rest = cap - cap // 16
  assert limits(1, True) == (True, {"memory.kmem.tcp.limit_in_bytes": cap // 16,
                                    "memory.limit_in_bytes": rest,
                                    "memory.memsw.limit_in_bytes": rest})
  assert limits(1, False) == (False, {"memory.limit_in_bytes": cap,
                                      "memory.memsw.limit_in_bytes": cap})
  # v2 charges socket buffers to memory.max itself: nothing to split.
  assert limits(2, True) == (True, {"memory.max": cap, "memory.swap.max": 0})
