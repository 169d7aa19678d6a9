"""Trusted runner executed inside the code sandbox (design: docs/RELIABILITY.md).

Standard library only, never imported by the harness: `code.py` starts it as a
script. Roles, chosen by argv[1]:

* ``check``: the trusted checker. Ignores every signal it can, drops root (when
  asked), makes itself non-dumpable, reads the job spec (with the harness's nonce)
  from stdin, runs the tests (opening no path once a candidate has run) and writes
  exactly one verdict line ``<nonce> PASS|FAIL <peak RSS kB> <reason>`` to the
  stdout it inherited from the harness. Candidate code never
  runs in this process: the candidate runs in separate processes (rlimits and the
  seccomp filter from the spec applied between fork and exec) that talk to the
  checker over pipes, and the checker does every comparison on plain decoded
  values, read under size, count and depth caps.
* ``serve``: the candidate process for HumanEval / call-based jobs. Executes the
  program, then answers ``call``/``describe`` requests. Untrusted by design: it
  can answer anything, so its answers only ever become plain data in the checker.
* ``script``: the candidate process of a stdio job (the program comes from a
  sealed memfd of the checker's, not from a file).
"""
import builtins
import json
import os
import sys

# Candidate roles start with `-I -S` (no site: the interpreter's own
# site-packages and .pth hooks stay out, and start-up is ~4x faster); modules
# only the checker needs are imported by _checker_imports().
ast = fcntl = resource = select = signal = subprocess = time = None


def _checker_imports() -> None:
  global ast, fcntl, resource, select, signal, subprocess, time
  import ast, fcntl, resource, select, signal, subprocess, time  # noqa: E401

# Bounds on what the checker reads from a candidate. A reply is one JSON line of
# at most _MSG_CAP bytes and _MAX_ITEMS values (counted as brackets + braces +
# commas, a C-speed over-estimate taken before parsing), nested at most
# _MAX_DEPTH deep. Each parsed value costs the checker <= ~100 bytes twice (json,
# then decode), so a hostile reply costs it tens of MB, not the ~30x of its size.
_MSG_CAP = 4 << 20
_MAX_ITEMS = 1 << 18
_MAX_DEPTH = 200
_MARGIN_S = 0.15  # report a clean FAIL before the harness kills the sandbox
# keyctl(2) operations and special keyring ids (linux/keyctl.h).
_KEYCTL_JOIN_SESSION_KEYRING, _KEYCTL_CLEAR = 1, 7
_KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING = -4, -5


class _Abort(BaseException):
  """Protocol failure, timeout or candidate death: always a FAIL.

  A BaseException, so `except Exception` in test code cannot swallow it.
  """


# ---------------------------------------------------------------- value codec
# Values cross the process boundary as JSON with tags for non-JSON builtins.
# The decoder only ever builds plain builtins, so objects with a rigged
# __eq__ (or any other behaviour) cannot reach the checker.

def encode(x, depth: int = 0):
  if depth > _MAX_DEPTH:
    raise TypeError("value nested too deeply")
  d = depth + 1
  if x is None or isinstance(x, bool):
    return None if x is None else bool(x)
  if isinstance(x, int):
    return int.__index__(x)
  if isinstance(x, float):
    return float.__float__(x)
  if isinstance(x, str):
    return str.__str__(x)
  if isinstance(x, list):
    return [encode(v, d) for v in list.__iter__(x)]
  if isinstance(x, tuple):
    return {"$": "tuple", "v": [encode(v, d) for v in tuple.__iter__(x)]}
  if isinstance(x, dict):
    return {"$": "dict", "v": [[encode(k, d), encode(v, d)] for k, v in dict.items(x)]}
  if isinstance(x, (set, frozenset)):
    tag = "frozenset" if isinstance(x, frozenset) else "set"
    return {"$": tag, "v": [encode(v, d) for v in x]}
  if isinstance(x, (bytes, bytearray)):
    return {"$": "bytes", "v": bytes(x).hex()}
  if isinstance(x, complex):
    return {"$": "complex", "v": [x.real, x.imag]}
  raise TypeError(f"cannot transfer a value of type {type(x).__name__}")


_TAGS = {
    "tuple": lambda v, d: tuple(decode(e, d) for e in v),
    "dict": lambda v, d: {decode(k, d): decode(e, d) for k, e in v},
    "set": lambda v, d: {decode(e, d) for e in v},
    "frozenset": lambda v, d: frozenset(decode(e, d) for e in v),
    "bytes": lambda v, d: bytes.fromhex(v),
    "complex": lambda v, d: complex(float(v[0]), float(v[1])),
}


def decode(x, depth: int = 0):
  if depth > _MAX_DEPTH:
    raise _Abort("value from candidate nested too deeply")
  t = type(x)
  if x is None or t in (bool, int, float, str):
    return x
  if t is list:
    return [decode(e, depth + 1) for e in x]
  if t is dict and set(x) == {"$", "v"} and x["$"] in _TAGS:
    return _TAGS[x["$"]](x["v"], depth + 1)
  raise _Abort("malformed value from candidate")


# ---------------------------------------------------------------- processes

def _libc():
  import ctypes  # lazily: only the checker needs it
  return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
  import ctypes
  if _libc().prctl(option, arg, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), f"prctl({option})")


def _keyrings(keyctl_nr: int, own_uid: bool) -> None:
  """Keyring hygiene (defence in depth: the seccomp filter denies keyctl to candidates).

  A fresh anonymous session keyring, so candidates never possess the harness's
  (it dies with the sandbox). With a uid of its own (root mode), the slot uid's
  user and user-session keyrings are emptied: they are per uid and outlive every
  process, so whatever a run left there would reach the next run in the slot.
  Never without one: there they would be the user's own keyrings.
  """
  libc = _libc()
  libc.syscall(keyctl_nr, _KEYCTL_JOIN_SESSION_KEYRING, None)
  if own_uid:
    for ring in (_KEY_SPEC_USER_KEYRING, _KEY_SPEC_USER_SESSION_KEYRING):
      libc.syscall(keyctl_nr, _KEYCTL_CLEAR, ring)


def _seccomp_fprog(prog: bytes):
  """A `struct sock_fprog` for prog (built before fork; kept alive by the caller)."""
  import ctypes

  class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
  buf = ctypes.create_string_buffer(prog, len(prog))
  return SockFprog(len(prog) // 8, ctypes.addressof(buf)), buf


def _ignore_signals() -> list:
  """Ignore every signal that can be ignored; returns them (candidates get SIG_DFL back).

  A candidate runs as the checker's uid, so it may signal the checker: ignored
  signals change nothing (Python's SIGINT handler would raise KeyboardInterrupt
  into the test; without a pid namespace SIGTERM would kill it: a verdict or a
  grader fault of the candidate's choosing). SIGKILL and SIGSTOP cannot be ignored: as init of the
  sandbox's pid namespace the kernel drops them when they come from inside.
  SIGCHLD keeps its default (ignoring it would auto-reap children).
  """
  out = []
  for sig in signal.valid_signals():
    if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
      continue
    try:
      signal.signal(sig, signal.SIG_IGN)
      out.append(sig)
    except (OSError, ValueError):  # reserved by libc (32, 33)
      pass
  return out


_CATCHABLE: list = []


def _candidate_preexec(limits: dict, seccomp: bytes):
  """Runs in the child between fork and exec (the checker is single-threaded)."""
  import ctypes
  libc = _libc()  # resolved before fork
  fprog = _seccomp_fprog(seccomp) if seccomp else None

  def apply():
    for sig in _CATCHABLE:  # the checker ignores them; ignored stays ignored across exec
      signal.signal(sig, signal.SIG_DFL)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the checker
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))
    for res, val in ((resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_AS, limits["memory_mb"] << 20),
                     (resource.RLIMIT_NPROC, limits["nproc"]),
                     (resource.RLIMIT_FSIZE, limits["file_size_mb"] << 20),
                     (resource.RLIMIT_NOFILE, limits["open_files"]),
                     (resource.RLIMIT_CORE, 0)):
      # Soft == hard, except CPU: SIGXCPU at the soft limit, SIGKILL 1 s later.
      hard = val + 1 if res == resource.RLIMIT_CPU else val
      resource.setrlimit(res, (val, hard))
    if fprog is not None:  # last: from here on only execve of the interpreter
      # PR_SET_SECCOMP, SECCOMP_MODE_FILTER (no_new_privs is set in check_main)
      if libc.prctl(22, 2, ctypes.byref(fprog[0]), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused by the kernel")
  return apply


class _Ctx:
  """Per-run state of the checker: spec, deadline, candidate processes."""

  def __init__(self, spec: dict):
    self.spec = spec
    self.deadline = time.monotonic() + spec["limits"]["wall_s"] - _MARGIN_S
    self.env = {"PATH": "/usr/bin:/bin", "HOME": spec["scratch"],
                "TMPDIR": spec["scratch"], "LANG": "C.UTF-8"}
    self.preexec = _candidate_preexec(spec["limits"], bytes.fromhex(spec["seccomp"]))

  def remaining(self) -> float:
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise _Abort("timeout")
    return left

  def spawn(self, argv, stdin, stdout, pass_fds=()):
    # Own process group, so reap() can kill what it forked (matters without bwrap).
    return subprocess.Popen(
        argv, stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL,
        cwd=self.spec["scratch"], env=self.env, close_fds=True, pass_fds=pass_fds,
        start_new_session=True, preexec_fn=self.preexec)

  def reap(self, proc) -> None:
    """Kill a candidate and everything it started, then reap it."""
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped: the group id is still ours
    except OSError:
      pass
    proc.wait()
    if not (self.spec["pidns"] and os.getpid() == 1):
      return
    # We are init of bwrap's pid namespace: kill(-1) reaches every other process
    # in it (double-forked daemons included), and their orphans are ours to
    # reap (zombies would still count for RLIMIT_NPROC). Never done outside.
    while True:
      try:
        os.kill(-1, signal.SIGKILL)
      except OSError:
        pass
      try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
          time.sleep(0.001)
      except ChildProcessError:
        return


def _write_all(fd: int, data: bytes, ctx: _Ctx) -> None:
  view = memoryview(data)
  while view:
    _, w, _ = select.select([], [fd], [], ctx.remaining())
    if w:
      try:
        n = os.write(fd, view[:1 << 16])
      except (BrokenPipeError, BlockingIOError):
        raise _Abort("candidate closed its input")
      view = view[n:]


class _Server:
  """Checker-side handle on a `serve` candidate process (newline-JSON RPC)."""

  def __init__(self, ctx: _Ctx, program: str):
    self.ctx = ctx
    req_r, self.req_w = os.pipe()
    self.resp_r, resp_w = os.pipe()
    os.set_blocking(self.req_w, False)
    self.proc = ctx.spawn([ctx.spec["python"], "-I", "-S", ctx.spec["runner"], "serve",
                           str(req_r), str(resp_w)],
                          subprocess.DEVNULL, subprocess.DEVNULL, (req_r, resp_w))
    os.close(req_r)
    os.close(resp_w)
    self.buf = bytearray()
    reply = self.request({"program": program})
    if "error" in reply:
      raise _Abort(str(reply["error"])[:300])

  def request(self, msg: dict) -> dict:
    _write_all(self.req_w, json.dumps(msg).encode() + b"\n", self.ctx)
    while (end := self.buf.find(b"\n")) < 0:
      if len(self.buf) > _MSG_CAP:
        raise _Abort("candidate reply too large")
      r, _, _ = select.select([self.resp_r], [], [], self.ctx.remaining())
      if not r:
        continue
      chunk = os.read(self.resp_r, 1 << 16)
      if not chunk:
        raise _Abort("candidate process died")
      self.buf += chunk
    if end > _MSG_CAP:
      raise _Abort("candidate reply too large")
    line = bytes(self.buf[:end])
    del self.buf[:end + 1]
    if line.count(b"[") + line.count(b"{") + line.count(b",") > _MAX_ITEMS:
      raise _Abort("candidate reply has too many values")
    try:
      reply = json.loads(line)
    except (ValueError, RecursionError):
      raise _Abort("malformed reply from candidate")
    if type(reply) is not dict:
      raise _Abort("malformed reply from candidate")
    return reply

  def call(self, name: str, args: tuple):
    reply = self.request({"op": "call", "name": name, "args": encode(list(args))})
    if "value" in reply:
      try:
        return decode(reply["value"])
      except (TypeError, ValueError, RecursionError):
        raise _Abort("malformed value from candidate")
    exc = getattr(builtins, str(reply.get("raise")), None)
    if isinstance(exc, type) and issubclass(exc, Exception):
      # Ordinary exceptions stay catchable by tests that expect them.
      raise exc(str(reply.get("msg", ""))[:300])
    raise _Abort(f"candidate raised {str(reply.get('raise'))[:80]}")

  def proxy(self, name: str):
    def candidate_proxy(*args):
      return self.call(name, args)
    candidate_proxy.__name__ = name
    return candidate_proxy

  def close(self) -> None:
    for fd in (self.req_w, self.resp_r):
      os.close(fd)
    self.ctx.reap(self.proc)


def _free_names(test: str) -> set:
  """Names the test code reads but never binds (helpers from the program)."""
  loads, bound = set(), set()
  for node in ast.walk(ast.parse(test)):
    if isinstance(node, ast.Name):
      (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
  return loads - bound - set(dir(builtins))


def _check_humaneval(ctx: _Ctx) -> None:
  spec = ctx.spec
  server = _Server(ctx, spec["program"])
  try:
    env = {"__name__": "__check__", "__builtins__": builtins}
    for name in sorted(_free_names(spec["test"]) | {spec["entry_point"]}):
      info = server.request({"op": "describe", "name": name})
      kind = info.get("kind")
      if kind == "callable":
        env[name] = server.proxy(name)
      elif kind == "value":
        env[name] = decode(info.get("value"))
      elif kind == "module" and str(info.get("module")) in sys.stdlib_module_names:
        env[name] = __import__(str(info["module"]))
    if spec["entry_point"] not in env:
      raise _Abort(f"{spec['entry_point']} is not defined")
    exec(compile(spec["test"], "<test>", "exec"), env)
    env["check"](env[spec["entry_point"]])
  finally:
    server.close()


def _plain(x):
  return [_plain(e) for e in x] if isinstance(x, (list, tuple)) else x


def _check_call_based(ctx: _Ctx) -> None:
  spec = ctx.spec
  server = _Server(ctx, spec["program"])
  try:
    for i, (args, want) in enumerate(zip(spec["inputs"], spec["outputs"])):
      got = _plain(server.call(spec["fn_name"], tuple(args) if isinstance(args, list) else (args,)))
      # Like APPS: expected outputs are often wrapped in a one-element list.
      if not (got == want or (isinstance(want, list) and want and got == want[0])):
        raise AssertionError(f"test {i}: wrong output")
  finally:
    server.close()


def _same_stdout(got: str, want: str) -> bool:
  """APPS-style comparison: stripped lines, then whitespace tokens (floats with tolerance)."""
  def lines(s):
    out = [ln.strip() for ln in s.strip().splitlines()]
    return [ln for ln in out if ln]
  if lines(got) == lines(want):
    return True
  gt, wt = got.split(), want.split()
  if len(gt) != len(wt):
    return False
  for a, b in zip(gt, wt):
    if a == b:
      continue
    try:
      fa, fb = float(a), float(b)
    except ValueError:
      return False
    if not abs(fa - fb) <= 1e-8 + 1e-5 * abs(fb):  # numpy.allclose defaults
      return False
  return True


def _run_stdio(ctx: _Ctx, program_fd: int, data: bytes) -> str:
  cap = ctx.spec["limits"]["max_output_kb"] << 10
  proc = ctx.spawn([ctx.spec["python"], "-I", "-S", ctx.spec["runner"], "script",
                    str(program_fd)], subprocess.PIPE, subprocess.PIPE, (program_fd,))
  try:
    inp, out = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(inp, False)
    view, buf, open_in = memoryview(data), bytearray(), True
    if not data:
      proc.stdin.close()
      open_in = False
    while True:
      r, w, _ = select.select([out], [inp] if open_in else [], [], ctx.remaining())
      if w:
        try:
          view = view[os.write(inp, view[:1 << 16]):]
        except (BrokenPipeError, BlockingIOError):
          view = view[:0]
        if not view:
          proc.stdin.close()
          open_in = False
      if r:
        chunk = os.read(out, 1 << 16)
        if not chunk:
          break
        buf += chunk
        if len(buf) > cap:
          raise _Abort("output limit exceeded")
    try:
      code = proc.wait(ctx.remaining())
    except subprocess.TimeoutExpired:
      raise _Abort("timeout")
    if code != 0:
      raise AssertionError(f"exit status {code}")
    return buf.decode("utf-8", "replace")
  finally:
    if open_in:
      proc.stdin.close()
    proc.stdout.close()
    ctx.reap(proc)


def _sealed_program(program: str) -> int:
  """The program in a sealed memfd: read-only for every candidate, no path at all.

  The checker never opens a path after a candidate ran: scratch is writable by
  candidates (same uid), so a file there could be swapped for a FIFO that
  blocks the checker's open() until the wall limit (a grader fault for a wrong
  program). A memfd is created by the checker (the filter denies it to
  candidates only) and sealed, so an earlier test's run cannot alter it either.
  """
  fd = os.memfd_create("main.py", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
  view = memoryview(program.encode("utf-8", "surrogatepass"))
  while view:
    view = view[os.write(fd, view):]
  fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
              | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
  return fd


def _check_stdio(ctx: _Ctx) -> None:
  spec = ctx.spec
  program_fd = _sealed_program(spec["program"])
  try:
    for i, (inp, want) in enumerate(zip(spec["inputs"], spec["outputs"])):
      got = _run_stdio(ctx, program_fd, inp.encode())
      if not _same_stdout(got, want):
        raise AssertionError(f"test {i}: wrong output {got[-300:]!r}")
  finally:
    os.close(program_fd)


def _drop_privileges(uid: int, gid: int) -> None:
  os.setgroups([])
  os.setresgid(gid, gid, gid)
  os.setresuid(uid, uid, uid)  # from root to non-root: clears every capability
  with open("/proc/self/status") as f:
    caps = [ln.split()[1] for ln in f if ln.startswith(("CapEff", "CapPrm"))]
  if os.getresuid() != (uid,) * 3 or any(int(c, 16) for c in caps):
    raise SystemExit("privilege drop failed")


def _write_verdict(fd: int, nonce: str, ok: bool, reason) -> None:
  """One line `<nonce> PASS|FAIL <peak RSS kB> <reason>`; cannot raise on any reason.

  ASCII with backslash escapes: a candidate's text (a lone surrogate, say) can
  reach the reason through an exception message.
  """
  try:
    text = " ".join(str(reason).split())[:300]
  except BaseException:  # a str() that raises
    text = "unprintable reason"
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  line = f"{nonce} {'PASS' if ok else 'FAIL'} {rss_kb} {text}"
  view = memoryview(line.encode("ascii", "backslashreplace")[:2000] + b"\n")
  while view:
    view = view[os.write(fd, view):]


def check_main(argv: list) -> int:
  _checker_imports()
  _CATCHABLE[:] = _ignore_signals()  # first: before any candidate exists
  _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS: no setuid/file-cap binary can regain privileges
  if len(argv) == 2:
    _drop_privileges(int(argv[0]), int(argv[1]))
  _prctl(4, 0)  # PR_SET_DUMPABLE=0: same-uid candidates cannot ptrace us or open /proc/<us>/{fd,mem,environ}
  spec = json.loads(sys.stdin.buffer.read())
  verdict_fd = os.dup(1)  # non-inheritable: candidates never get it
  devnull = os.open(os.devnull, os.O_RDWR)
  os.dup2(devnull, 0)
  os.dup2(devnull, 1)  # prints of the (trusted) test code must not reach the verdict channel
  os.chdir(spec["scratch"])
  own_uid = len(argv) == 2
  _keyrings(spec["keyctl_nr"], own_uid)
  ok, reason = False, ""
  try:
    {"humaneval": _check_humaneval, "call_based": _check_call_based,
     "stdio": _check_stdio}[spec["kind"]](_Ctx(spec))
    ok = True
  except _Abort as e:
    reason = e
  except BaseException as e:  # failed assert, wrong answer, exception from candidate
    try:
      reason = f"{type(e).__name__}: {e}"
    except BaseException:
      reason = type(e).__name__
  if own_uid:  # every candidate is dead (reaped): leave the slot's keyrings empty
    _keyrings(spec["keyctl_nr"], own_uid)
  _write_verdict(verdict_fd, spec["nonce"], ok, reason)
  return 0


# ---------------------------------------------------------------- candidate side

class _Quitter:
  """`exit()` / `quit()`, which `site` would have provided (APPS code uses them)."""

  def __init__(self, name):
    self.name = name

  def __repr__(self):
    return f"Use {self.name}() to exit"

  def __call__(self, code=None):
    raise SystemExit(code)


def _candidate_start() -> None:
  builtins.exit, builtins.quit = _Quitter("exit"), _Quitter("quit")
  # Under memory pressure (the sandbox's memory cgroup, or the host) the OOM
  # killer takes candidates before the checker, whose death is a grader fault.
  # Here, after exec: the child is dumpable again, so its /proc/self is its own
  # (a program can lower it back only to the checker's value).
  try:
    with open("/proc/self/oom_score_adj", "w") as f:
      f.write("1000")
  except OSError:
    pass


def script_main(program_fd: int) -> None:
  """Untrusted: run a stdio program (read from the checker's sealed memfd) as `__main__`."""
  _candidate_start()
  chunks, offset = [], 0
  while chunk := os.pread(program_fd, 1 << 20, offset):
    chunks.append(chunk)
    offset += len(chunk)
  os.close(program_fd)
  sys.argv = ["main.py"]
  code = compile(b"".join(chunks).decode("utf-8", "surrogatepass"), "main.py", "exec")
  exec(code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins})


def serve_main(req_fd: int, resp_fd: int) -> int:
  """Untrusted: runs the program, then answers requests until EOF."""
  _candidate_start()
  rf, wf = os.fdopen(req_fd, "rb"), os.fdopen(resp_fd, "wb")

  def reply(obj):
    wf.write(json.dumps(obj).encode() + b"\n")
    wf.flush()

  program = json.loads(rf.readline())["program"]
  ns = {"__name__": "__candidate__", "__builtins__": builtins}
  try:
    exec(compile(program, "<program>", "exec"), ns)
  except BaseException as e:
    reply({"error": f"program failed: {type(e).__name__}: {e}"})
    return 1
  reply({"ready": True})

  def resolve(name):
    if name in ns:
      return ns[name]
    if isinstance(ns.get("Solution"), type):  # LeetCode-style APPS starter code
      return getattr(ns["Solution"](), name)
    raise NameError(name)

  for line in rf:
    req = json.loads(line)
    try:
      if req.get("op") == "describe":
        try:
          value = resolve(req["name"])
        except (NameError, AttributeError):
          reply({"kind": "missing"})
          continue
        if type(value).__name__ == "module":
          reply({"kind": "module", "module": value.__name__})
        elif callable(value):
          reply({"kind": "callable"})
        else:
          reply({"kind": "value", "value": encode(value)})
      else:
        reply({"value": encode(resolve(req["name"])(*decode(req["args"])))})
    except BaseException as e:
      try:
        msg = str(e)[:300]
      except BaseException:
        msg = ""
      reply({"raise": type(e).__name__, "msg": msg})
  return 0


if __name__ == "__main__":
  if sys.argv[1] == "serve":
    sys.exit(serve_main(int(sys.argv[2]), int(sys.argv[3])))
  if sys.argv[1] == "script":
    script_main(int(sys.argv[2]))
  else:
    sys.exit(check_main(sys.argv[2:]))
