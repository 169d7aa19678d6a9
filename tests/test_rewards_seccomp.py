"""The seccomp deny list (rewards/seccomp.py), checked without a kernel in the loop.

Syscall numbers are compared with the kernel's own headers (linux-libc-dev), and
the compiled filters are run, for both architectures, through a small classic-BPF
interpreter written from the BPF spec (linux/filter.h, seccomp(2)). Whether the
kernel enforces the filter on real programs is tests/test_rewards_code.py's job.
"""
import errno
import os
import re
import struct

import pytest

from restem_jax.rewards import seccomp

HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
           "aarch64": "/usr/include/asm-generic/unistd.h"}
AUDIT_ARCH_I386, AUDIT_ARCH_ARM = 0x40000003, 0x40000028
# Calls every Python program makes: must stay allowed. (x86_64, aarch64)
ALLOWED = {"read": (0, 63), "write": (1, 64), "openat": (257, 56), "mmap": (9, 222),
           "execve": (59, 221), "exit_group": (231, 94), "wait4": (61, 260),
           "rt_sigaction": (13, 134), "futex": (202, 98), "pipe2": (293, 59),
           "prctl": (157, 167)}
CLONE_NEW = {"NEWNS": 0x00020000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000,
             "NEWIPC": 0x08000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000,
             "NEWNET": 0x40000000}
FORK_FLAGS = 0x01200011  # glibc fork(): CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
THREAD_FLAGS = 0x003D0F00  # pthread_create's clone fallback: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|..TID


def run_bpf(prog: bytes, nr: int, arch: int, args=(0,) * 6) -> int:
  """Classic-BPF semantics for the opcodes a seccomp filter may use (a subset)."""
  data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
  insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
  acc, pc = 0, 0
  while True:
    code, jt, jf, k = insns[pc]
    pc += 1
    if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
      acc = struct.unpack_from("=I", data, k)[0]
    elif code == 0x06:  # BPF_RET | BPF_K
      return k
    elif code in (0x15, 0x35, 0x45):  # BPF_JMP | JEQ / JGE / JSET, BPF_K
      taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
      pc += jt if taken else jf
    else:
      raise AssertionError(f"unexpected BPF opcode {code:#x}")


def header_numbers(arch):
  path = HEADERS[arch]
  if not os.path.exists(path):
    pytest.skip(f"{path} not installed (apt-get install linux-libc-dev)")
  with open(path) as f:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", f.read())}


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_syscall_numbers_match_kernel_headers(arch):
  nrs = header_numbers(arch)
  col = list(seccomp.ARCHES).index(arch)
  table = dict(seccomp.DENIED, clone=seccomp.CLONE, clone3=seccomp.CLONE3, **seccomp.SOCKET,
               **ALLOWED)
  wrong = {name: (ours[col], nrs.get(name)) for name, ours in table.items()
           if nrs.get(name) != ours[col]}
  assert not wrong


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_filter_verdicts(arch):
  prog = seccomp.filter_bytes(arch)
  audit, col = seccomp.ARCHES[arch], list(seccomp.ARCHES).index(arch)
  eperm = seccomp.RET_ERRNO | errno.EPERM
  for name, nrs in seccomp.DENIED.items():
    assert run_bpf(prog, nrs[col], audit) == eperm, name
  for name, nrs in ALLOWED.items():
    assert run_bpf(prog, nrs[col], audit) == seccomp.RET_ALLOW, name
  clone = seccomp.CLONE[col]
  assert run_bpf(prog, clone, audit, (FORK_FLAGS, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
  assert run_bpf(prog, clone, audit, (THREAD_FLAGS, 0, 0, 0, 0, 0)) == seccomp.RET_ALLOW
  for flag, bit in CLONE_NEW.items():
    assert run_bpf(prog, clone, audit, (FORK_FLAGS | bit, 0, 0, 0, 0, 0)) == eperm, flag
  # Only the low 32 bits of the flags are read: high garbage cannot hide a namespace bit.
  assert run_bpf(prog, clone, audit, ((1 << 40) | CLONE_NEW["NEWUSER"],) + (0,) * 5) == eperm
  assert run_bpf(prog, seccomp.CLONE3[col], audit) == seccomp.RET_ERRNO | errno.ENOSYS
  # Another ABI's numbers mean other calls: the process dies instead.
  foreign = AUDIT_ARCH_I386 if arch == "x86_64" else AUDIT_ARCH_ARM
  for nr in (0, 1, 250, 400):
    assert run_bpf(prog, nr, foreign) == seccomp.RET_KILL_PROCESS
  if arch == "x86_64":  # x32: same AUDIT_ARCH, bit 30 set in the number
    assert run_bpf(prog, 0x40000000 | 250, audit) == seccomp.RET_KILL_PROCESS
    assert run_bpf(prog, 0x40000000 | 0, audit) == seccomp.RET_KILL_PROCESS


# linux/socket.h: AF_UNIX 1, AF_INET 2, AF_INET6 10 may be created; e.g. AF_NETLINK 16,
# AF_PACKET 17, AF_ALG 38, AF_VSOCK 40, AF_XDP 44 and AF_MCTP 45 (the last today) may not.
AF_OK = {1, 2, 10}


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_socket_families(arch):
  prog = seccomp.filter_bytes(arch)
  audit, col = seccomp.ARCHES[arch], list(seccomp.ARCHES).index(arch)
  refused = seccomp.RET_ERRNO | errno.EAFNOSUPPORT
  for name, nrs in seccomp.SOCKET.items():
    for family in range(64):
      want = seccomp.RET_ALLOW if family in AF_OK else refused
      assert run_bpf(prog, nrs[col], audit, (family, 1, 0, 0, 0, 0)) == want, (name, family)
    # The kernel reads an int: high bits change nothing, either way.
    assert run_bpf(prog, nrs[col], audit, ((7 << 32) | 16,) + (0,) * 5) == refused
    assert run_bpf(prog, nrs[col], audit, ((7 << 32) | 2,) + (0,) * 5) == seccomp.RET_ALLOW
    assert run_bpf(prog, nrs[col], audit, (0xFFFFFFFF,) + (0,) * 5) == refused
  # A family value is not read for other calls (connect's arg0 is an fd).
  assert run_bpf(prog, ALLOWED["read"][col], audit, (40,) + (0,) * 5) == seccomp.RET_ALLOW


def test_native_arch_and_unknown_arch(monkeypatch):
  assert seccomp.native_arch() in seccomp.ARCHES  # the machines this runs on
  monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
  with pytest.raises(OSError, match="no seccomp syscall table for riscv64"):
    seccomp.filter_bytes()
