"""Binary reward for generated programs: 1.0 iff every test passes inside a sandbox.

Job kinds: HumanEval (`check(candidate)` test code), APPS call-based (`fn_name` +
argument / expected-output lists) and APPS standard-input (stdout compared like APPS).

Each job runs in a fresh bubblewrap sandbox: its own pid, net, ipc, uts and cgroup
namespaces, a read-only view of only the files the interpreter needs, a size-capped
private /tmp as the only writable place, a cleared environment, a dedicated
unprivileged uid per worker slot (when run as root), rlimits, a seccomp filter
(`seccomp.py`) and a memory cgroup (`memcg.py`) where one can be made. The verdict
comes from a trusted checker (`_sandbox_runner.py check`, the sandbox's pid 1) that
runs candidate code only in other processes and writes `<nonce> PASS|FAIL` to a
channel no candidate holds; the harness accepts only the nonce it drew for the job.
A wrong, crashing, slow or hostile program is a FAIL; a sandbox that fails to start,
hangs, or whose checker dies is a grader fault (reward 0, logged, counted in
`faults`). Why each piece is there, what bounds each resource, the tests that show
it and what is not promised: docs/RELIABILITY.md, "Code sandbox".

`unsafe_local_exec=True` (only where a user explicitly asks, e.g. no bubblewrap) runs
the same checker without bwrap: no filesystem, network or pid isolation.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from restem_jax.rewards import memcg, seccomp

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
_SANDBOX_RUNNER = "/sandbox/runner.py"
DEFAULT_UID_BASE = 2_000_000_000
_INSTANCES = itertools.count()
_INSTALL_HINT = ("bubblewrap (`bwrap`) is required to run generated code in a sandbox: "
                 "install it with `apt-get install bubblewrap` (Debian/Ubuntu; "
                 "`dnf install bubblewrap` on Fedora). Only if you accept running "
                 "untrusted code unisolated, pass CodeExecutor(unsafe_local_exec=True).")
_LOG = logging.getLogger(__name__)
# Self-test program: prints 42 only where the seccomp filter denies memfd_create.
_PROBE = ("import os\ntry:\n    os.memfd_create('probe')\n    print('memfd_create allowed')\n"
          "except PermissionError:\n    print(6 * 7)\n")
_EMPTY_JOB = {"kind": "stdio", "program": "", "inputs": [""], "outputs": [""]}


@dataclasses.dataclass(frozen=True)
class Limits:
  cpu_s: float = 4  # CPU seconds per candidate process
  wall_s: float = 10  # wall clock for the whole job (all its tests)
  memory_mb: int = 512  # address space per process
  max_procs: int = 32  # processes + threads of the sandbox user
  file_size_mb: int = 16  # largest file a program may write
  open_files: int = 64
  max_output_kb: int = 256  # stdout of one stdio run
  scratch_mb: int = 64  # size of the private /tmp
  sandbox_memory_mb: int = 1024  # all processes of one sandbox together (memory cgroup)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One job's result. `fault` is None when the checker delivered a verdict (PASS
  or FAIL: the program's doing); otherwise the grader failed on this sample
  ("sandbox hung", "checker died", "sandbox failed to start") and reward is 0."""
  reward: float
  reason: str
  wall_s: float
  fault: str | None = None
  checker_rss_mb: float | None = None  # the checker's peak resident memory


class SandboxError(RuntimeError):
  """The sandbox itself failed (not the program): never silently a 0 reward."""


def apps_tests(input_output_json: str) -> dict:
  """Parse APPS's `input_output` field into a job dict (without the program)."""
  io = json.loads(input_output_json)
  if io.get("fn_name"):
    return {"kind": "call_based", "fn_name": io["fn_name"],
            "inputs": list(io["inputs"]), "outputs": list(io["outputs"])}

  def text(x):  # some APPS tests store a list of lines instead of one string
    return "\n".join(map(str, x)) if isinstance(x, list) else str(x)
  return {"kind": "stdio", "inputs": [text(x) for x in io["inputs"]],
          "outputs": [text(x) for x in io["outputs"]]}


def _procs_of_uid(uid: int) -> list[int]:
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        for line in f:
          if line.startswith("Uid:"):
            if int(line.split()[1]) == uid:
              pids.append(int(name))
            break
    except OSError:
      continue  # exited meanwhile
  return pids


def _traversable_parents(paths) -> list[str]:
  """`--dir` arguments for every parent of `paths`, mode 0755 (bwrap would copy the
  host's modes: /root is 0700, and the unprivileged uid could not reach the file)."""
  dirs = set()
  for p in paths:
    d = os.path.dirname(p)
    while d != "/":
      dirs.add(d)
      d = os.path.dirname(d)
  out = []
  for d in sorted(dirs):
    out += ["--perms", "0755", "--dir", d]
  return out


def _root_symlinks() -> list[str]:
  """/bin -> usr/bin and the like, where the host has them (merged /usr)."""
  out = []
  for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.islink(d):
      out += ["--symlink", os.readlink(d), d]
  return out


# Extension modules whose libraries are left out of the view (each bind costs bwrap
# time): they need a display, a NIS server or a terminal, none of which a sandbox has.
_NO_USE_IN_SANDBOX = ("_tkinter", "nis", "_curses", "_curses_panel", "readline")


@functools.lru_cache(maxsize=None)
def _interpreter_view(python: str) -> tuple[str, ...]:
  """bwrap arguments for the read-only files `python` needs, and nothing else.

  The interpreter, its standard library (site-packages hidden by an empty
  read-only tmpfs) and the shared libraries `ldd` lists for it and for the
  extension modules of lib-dynload (but _NO_USE_IN_SANDBOX's). Less to see means less page cache a program
  can probe for traces of an earlier program (docs/RELIABILITY.md). Without
  `ldd` the wide view (/usr and /lib*) is used, with a warning.
  """
  query = ("import json, sysconfig; print(json.dumps([sysconfig.get_path(k) for k in "
           "('stdlib', 'platstdlib', 'purelib', 'platlib')]))")
  dirs = json.loads(subprocess.run([python, "-I", "-S", "-c", query], capture_output=True,
                                   check=True, text=True).stdout)
  stdlibs = sorted({os.path.realpath(d) for d in dirs[:2]})
  hidden = sorted({os.path.realpath(d) for d in dirs[2:]} & {
      os.path.join(lib, "site-packages") for lib in stdlibs})
  ldd = shutil.which("ldd")
  if ldd is None:
    _LOG.warning("code sandbox: no `ldd`; the sandbox sees all of /usr and /lib*")
    return _wide_view(python)
  objects = [python] + [os.path.join(lib, "lib-dynload", n) for lib in stdlibs
                        if os.path.isdir(os.path.join(lib, "lib-dynload"))
                        for n in sorted(os.listdir(os.path.join(lib, "lib-dynload")))
                        if n.endswith(".so") and n.split(".")[0] not in _NO_USE_IN_SANDBOX]
  out = subprocess.run([ldd, *objects], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
  libs = set()
  for line in out.splitlines():
    words = line.split()
    path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
    if path.startswith("/") and os.path.exists(path):
      libs.add(path)
  # glibc loads libgcc_s at run time (thread cancellation unwinding).
  for lib in list(libs):
    if os.path.basename(lib).startswith("libc.so"):
      gcc_s = os.path.join(os.path.dirname(lib), "libgcc_s.so.1")
      if os.path.exists(gcc_s):
        libs.add(gcc_s)
  # A file is bound where the loader looks for it: its directory resolved (the
  # sandbox has the same /lib -> usr/lib symlinks), its own name kept (libz.so.1).
  files = {os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)): p
           for p in libs}
  files[os.path.realpath(python)] = python
  argv = _root_symlinks() + _traversable_parents(list(files) + stdlibs)
  for dest, src in sorted(files.items()):
    argv += ["--ro-bind", src, dest]
  for lib in stdlibs:
    argv += ["--ro-bind", lib, lib]
  for d in hidden:
    if os.path.isdir(d):
      argv += ["--size", "4096", "--perms", "0555", "--tmpfs", d, "--remount-ro", d]
  return tuple(argv)


@functools.lru_cache(maxsize=None)
def _wide_view(python: str) -> tuple[str, ...]:
  """/usr, /lib* and the interpreter's whole prefix, read-only (round two's view;
  kept for hosts without ldd and for benchmarks/rewards.py's comparison)."""
  argv = ["--ro-bind", "/usr", "/usr"] + _root_symlinks()
  for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.isdir(d) and not os.path.islink(d):
      argv += ["--ro-bind", d, d]
  prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python))}
  for p in sorted(prefixes):
    if p != "/usr" and not p.startswith("/usr/"):
      argv += _traversable_parents([p]) + ["--ro-bind", p, p]
  return tuple(argv)


def _children(pid: int) -> list[int]:
  kids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(name))
      except (OSError, IndexError, ValueError):
        continue
  return kids


class CodeExecutor:
  """Scores programs against tests, `num_workers` sandboxes at a time."""

  def __init__(self, limits: Limits = Limits(), num_workers: int = 2,
               unsafe_local_exec: bool = False, *, python: str | None = None,
               uid_base: int | None = None, _benchmark_without_seccomp: bool = False,
               _benchmark_wide_view: bool = False):
    self.limits = limits
    self.num_workers = max(1, int(num_workers))
    self.unsafe_local_exec = unsafe_local_exec
    self.python = os.path.realpath(python or sys.executable)
    self._root = os.geteuid() == 0
    self._bwrap = None
    self._wide_view = _benchmark_wide_view  # only benchmarks/rewards.py widens the view
    if not unsafe_local_exec:
      self._bwrap = shutil.which("bwrap")
      if self._bwrap is None:
        raise SandboxError(_INSTALL_HINT)
      try:  # computed once per interpreter; here, so that a failure names its cause
        (_wide_view if self._wide_view else _interpreter_view)(self.python)
      except (OSError, ValueError, subprocess.CalledProcessError) as e:
        raise SandboxError(f"code sandbox: cannot list the files {self.python} needs "
                           f"({e})") from None
    try:
      self._keyctl_nr = seccomp.syscall_number("keyctl")
      # Only benchmarks/rewards.py turns the filter off, to measure what it costs.
      self._seccomp = b"" if _benchmark_without_seccomp else seccomp.filter_bytes()
    except OSError as e:
      raise SandboxError(f"code sandbox: {e}") from None
    # Grader faults (not wrong programs) by kind, over the executor's lifetime.
    self.faults: collections.Counter[str] = collections.Counter()
    self._faults_lock = threading.Lock()
    # One uid per worker slot (root only): separate NPROC budgets, precise sweep.
    # The range is private to this process and executor, so two scorers running
    # at once (two runs, two test processes) never sweep each other's sandboxes.
    instance = next(_INSTANCES)
    if uid_base is None:
      if self.num_workers > 64:
        raise ValueError(f"num_workers={num_workers}: at most 64 sandboxes per executor")
      uid_base = (DEFAULT_UID_BASE + (os.getpid() % 1_000_000) * 256
                  + (instance % 4) * 64)
    self.sandbox_uids = ([uid_base + i for i in range(self.num_workers)]
                         if self._root and not unsafe_local_exec else [])
    self._cgroups, why = memcg.SlotCgroups.create(
        self.num_workers, limits.sandbox_memory_mb << 20, str(instance))
    if self._cgroups is None:
      _LOG.warning("code sandbox: no memory cgroup (%s); memory is bounded per process "
                   "only: %d MB x %d processes per sandbox", why, limits.memory_mb,
                   limits.max_procs)
    elif not self._cgroups.socket_memory_charged:
      _LOG.warning("code sandbox: this kernel does not charge socket buffers to the memory "
                   "cgroup (cgroup v1 without memory.kmem.tcp); they are bounded per socket "
                   "only (net.ipv4.tcp_{r,w}mem x %d files x %d processes)",
                   limits.open_files, limits.max_procs)
    self._slots: queue.Queue[int] = queue.Queue()
    for i in range(self.num_workers):
      self._slots.put(i)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers,
                                                       thread_name_prefix="sandbox")
    # Fail loudly now, not with a silent 0 reward per program later.
    expect = "memfd_create allowed" if _benchmark_without_seccomp else "42"
    probe = self._run({"kind": "stdio", "program": _PROBE, "inputs": [""], "outputs": [expect]})
    if probe.reward != 1.0:
      self.close()
      hint = " (the seccomp filter is not in force)" if "allowed" in probe.reason else ""
      raise SandboxError(f"sandbox self-test failed: {probe.reason}{hint}")
    self.faults.clear()

  @property
  def memory_cgroup(self) -> bool:
    """Whether each sandbox has a memory cgroup (Limits.sandbox_memory_mb in force)."""
    return self._cgroups is not None

  @property
  def socket_memory_charged(self) -> bool:
    """Whether TCP/UDP socket buffers count against sandbox_memory_mb too."""
    return self._cgroups is not None and self._cgroups.socket_memory_charged

  # ------------------------------------------------------------------ API
  def run_humaneval(self, program: str, test: str, entry_point: str) -> float:
    return self._run({"kind": "humaneval", "program": program, "test": test,
                      "entry_point": entry_point}).reward

  def run_call_based(self, program: str, fn_name: str, inputs: list, outputs: list) -> float:
    return self._run({"kind": "call_based", "program": program, "fn_name": fn_name,
                      "inputs": inputs, "outputs": outputs}).reward

  def run_stdio(self, program: str, inputs: list[str], outputs: list[str]) -> float:
    return self._run({"kind": "stdio", "program": program, "inputs": inputs,
                      "outputs": outputs}).reward

  def score(self, jobs: list[dict]) -> list[float]:
    """Rewards of many jobs ({"kind": ..., **kwargs of run_*}), in parallel, in order."""
    return [o.reward for o in self.score_detailed(jobs)]

  def score_detailed(self, jobs: list[dict]) -> list[Outcome]:
    return list(self._pool.map(self._run, jobs))

  def close(self) -> None:
    self._pool.shutdown(wait=True)
    if self._cgroups is not None:
      self._cgroups.close()

  def __enter__(self) -> "CodeExecutor":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------- internals
  def _run(self, job: dict) -> Outcome:
    kind = job.get("kind")
    if kind not in ("humaneval", "call_based", "stdio"):
      raise ValueError(f"unknown job kind {kind!r}")
    if kind != "humaneval" and len(job["inputs"]) != len(job["outputs"]):
      raise ValueError("inputs and outputs differ in length")
    slot = self._slots.get()  # bounds concurrent sandboxes, even for direct run_* calls
    try:
      return self._run_in_slot(job, slot)
    finally:
      self._slots.put(slot)

  def _run_in_slot(self, job: dict, slot: int, cleanup: bool = False) -> Outcome:
    nonce = secrets.token_hex(16)
    lim = dataclasses.asdict(self.limits)
    scratch = None
    if self.unsafe_local_exec:
      scratch = tempfile.mkdtemp(prefix="restem_code_")
      argv, env = [self.python, "-I", "-S", _RUNNER, "check"], {"PATH": "/usr/bin:/bin"}
      lim["nproc"] = self.limits.max_procs + self._procs_of_me()
    else:
      argv, env = self._bwrap_argv(slot), {"PATH": "/usr/bin:/bin"}
      lim["nproc"] = self.limits.max_procs + (0 if self._root else self._procs_of_me())
    if self._cgroups is not None:
      argv = self._cgroups.wrap(slot, argv)
    spec = dict(job, nonce=nonce, limits=lim, python=self.python,
                runner=_RUNNER if self.unsafe_local_exec else _SANDBOX_RUNNER,
                scratch=scratch or "/tmp", pidns=not self.unsafe_local_exec,
                seccomp=self._seccomp.hex(), keyctl_nr=self._keyctl_nr)
    data = json.dumps(spec).encode()
    t0 = time.monotonic()
    try:
      proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, start_new_session=True,
                              close_fds=True)
    except OSError as e:  # EAGAIN / ENOMEM / EMFILE on a loaded host
      if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
      return self._fault(slot, "sandbox failed to start", f"{e}", time.monotonic() - t0,
                         cleanup)
    timed_out = False
    try:
      out, err = proc.communicate(data, timeout=self.limits.wall_s + 1.0)
    except subprocess.TimeoutExpired:
      timed_out = True
      out, err = b"", b""
    finally:
      self._kill(proc)
      if self.sandbox_uids:
        self._sweep(self.sandbox_uids[slot])
      if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - t0
    if timed_out:  # the checker's own deadline is wall_s - 0.15 s: it is stuck
      return self._fault(slot, "sandbox hung", f"no verdict after {elapsed:.1f}s", elapsed,
                         cleanup)
    lines = out.decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].startswith(nonce + " "):
      msg = " ".join(err.decode("utf-8", "replace").split())
      if msg.startswith("bwrap:"):  # set-up failed before any candidate code ran
        return self._fault(slot, "sandbox failed to start", msg[:500], elapsed, cleanup)
      # The checker crashed or was killed (OOM, a signal from outside the sandbox).
      return self._fault(slot, "checker died", f"exit {proc.returncode} {msg[-300:]}", elapsed,
                         cleanup)
    word, rss_kb, reason = (lines[0][len(nonce) + 1:].split(" ", 2) + ["", ""])[:3]
    passed = word == "PASS" and elapsed <= self.limits.wall_s + 1.0
    rss = int(rss_kb) / 1024 if rss_kb.isdigit() else None
    return Outcome(1.0 if passed else 0.0, f"{word} {reason}", elapsed, checker_rss_mb=rss)

  def _fault(self, slot: int, kind: str, detail: str, elapsed: float,
             cleanup: bool) -> Outcome:
    """The grader, not the program, failed on this sample: reward 0, logged, counted."""
    _LOG.warning("code sandbox fault in slot %d: %s (%s)%s", slot, kind, detail[:300],
                 "" if cleanup else "; the sample scores 0")
    if not cleanup:
      with self._faults_lock:
        self.faults[kind] += 1
      if self.sandbox_uids:
        # The checker empties the slot uid's keyrings when it starts and ends; this
        # one may have died first, so a fresh checker does it now.
        self._run_in_slot(_EMPTY_JOB, slot, cleanup=True)
    return Outcome(0.0, f"{kind}: {detail}", elapsed, fault=kind)

  def _procs_of_me(self) -> int:
    return len(_procs_of_uid(os.getuid()))

  def _kill(self, proc: subprocess.Popen) -> None:
    """Kill a still-running sandbox and reap bwrap: no orphans, no zombies."""
    if proc.returncode is None:  # only before reaping: afterwards the pid may be reused
      if not self.unsafe_local_exec:
        # SIGKILL of the namespace's init (the runner, bwrap's only child) kills
        # every process inside it; bwrap then reaps it and exits.
        for kid in _children(proc.pid):
          try:
            os.kill(kid, signal.SIGKILL)
          except OSError:
            pass
        try:
          proc.wait(2.0)
        except subprocess.TimeoutExpired:
          pass
      if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap / the unsafe runner; candidates
        proc.wait()                          # follow via their parent-death signal
    for f in (proc.stdout, proc.stderr, proc.stdin):
      if f:
        f.close()

  def _sweep(self, uid: int) -> None:
    """Belt and braces: nothing owned by the slot's uid survives a job."""
    deadline = time.monotonic() + 5.0
    while (pids := _procs_of_uid(uid)) and time.monotonic() < deadline:
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
      time.sleep(0.01)

  def _bwrap_argv(self, slot: int) -> list[str]:
    lim = self.limits
    argv = [self._bwrap]
    if self._root:
      # No user namespace (docs/RELIABILITY.md): the runner drops to the slot uid.
      argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--cap-drop", "ALL",
               "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
      argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
    # --as-pid-1: the runner is the namespace's init. bwrap's own init would be
    # orphaned (a zombie under a non-reaping host pid 1) when bwrap exits; the
    # runner is the direct child of bwrap, which reaps it. As init it also cannot
    # be signalled by the candidates, and its exit kills the whole namespace.
    argv += ["--as-pid-1", "--die-with-parent", "--new-session", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
             "--setenv", "HOME", "/tmp"]
    argv += _wide_view(self.python) if self._wide_view else _interpreter_view(self.python)
    argv += ["--perms", "0755", "--dir", os.path.dirname(_SANDBOX_RUNNER),
             "--ro-bind", _RUNNER, _SANDBOX_RUNNER,
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(lim.scratch_mb << 20), "--tmpfs", "/tmp",
             "--perms", "1777", "--size", str(1 << 20), "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
             self.python, "-I", "-S", _SANDBOX_RUNNER, "check"]
    if self._root:
      uid = self.sandbox_uids[slot]
      argv += [str(uid), str(uid)]
    return argv
