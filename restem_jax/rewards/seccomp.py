"""A seccomp-BPF deny list for sandboxed test programs (x86_64 and aarch64).

`filter_bytes()` returns a classic-BPF program (an array of `struct sock_filter`,
the format of `seccomp_export_bpf` and of `prctl(PR_SET_SECCOMP,
SECCOMP_MODE_FILTER, &sock_fprog)`). The trusted checker installs it in every
candidate process between fork and exec (see _sandbox_runner.py); children
inherit it and cannot remove it.

What it denies, and why a test program never needs it:
* kernel keyrings (add_key, request_key, keyctl): per-uid state that outlives
  the sandbox, i.e. a channel from one sample to a later one;
* new namespaces (unshare, setns, clone with CLONE_NEW*) and mounts (mount,
  the fsopen family, pivot_root, chroot): a user namespace of its own lets a
  program mount a tmpfs that no scratch cap or RLIMIT_AS bounds;
* memory outside RLIMIT_AS: System V shared memory, semaphores and message
  queues, POSIX message queues, memfd_create / memfd_secret, vmsplice;
* introspection of other processes (ptrace, process_vm_*, pidfd_getfd, kcmp)
  and large kernel attack surface (bpf, perf_event_open, userfaultfd,
  io_uring, open_by_handle_at);
* privileged operations (modules, kexec, reboot, swap, acct, quotactl):
  already impossible without capabilities; denied as belt and braces;
* socket families other than AF_UNIX, AF_INET and AF_INET6 (socket and
  socketpair fail with EAFNOSUPPORT): a network namespace does not isolate
  AF_VSOCK (it leads to the VM's host), and netlink, packet, alg, ... are
  kernel attack surface no graded program needs.
Denied calls fail with EPERM, so a program sees an ordinary OSError. clone3
fails with ENOSYS: its flags sit in a struct BPF cannot read, and glibc
(pthread_create, posix_spawn) then falls back to clone, whose flags are
checked. A syscall of another ABI (i386 or x32 on x86_64, arm32 on aarch64)
kills the process: the table only knows native numbers.
"""
from __future__ import annotations

import errno
import platform
import struct

# `struct seccomp_data`: int nr; __u32 arch; __u64 ip; __u64 args[6] (native endian).
_NR, _ARCH, _ARG0_LO = 0, 4, 16
# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
# Filter return values (linux/seccomp.h).
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (all in
# clone's low 32 flag bits; CLONE_NEWTIME is honoured by unshare/clone3 only).
CLONE_NS_FLAGS = 0x7E020000

# AUDIT_ARCH_* (linux/audit.h) and syscall numbers: x86_64 from
# arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from asm-generic/unistd.h.
ARCHES = {
    "x86_64": 0xC000003E,
    "aarch64": 0xC00000B7,
}
X32_SYSCALL_BIT = 0x40000000

DENIED = {  # name: (x86_64, aarch64)
    # keyrings
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    # namespaces and mounts
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    # memory that RLIMIT_AS does not count
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "memfd_create": (319, 279), "memfd_secret": (447, 447),
    "vmsplice": (278, 75),
    # other processes, kernel attack surface
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    # privileged anyway
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
}
CLONE = (56, 220)
CLONE3 = (435, 435)
SOCKET = {"socket": (41, 198), "socketpair": (53, 199)}
# AF_UNIX, AF_INET, AF_INET6 (linux/socket.h): the families a sandbox may create.
ALLOWED_FAMILIES = (1, 2, 10)


def native_arch() -> str:
  """The kernel ABI this interpreter uses, as a key of ARCHES."""
  machine = platform.machine().lower()
  arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
  if arch not in ARCHES or struct.calcsize("P") != 8:
    raise OSError(f"no seccomp syscall table for {machine} ({8 * struct.calcsize('P')}-bit); "
                  f"supported: {', '.join(ARCHES)}")
  return arch


def syscall_number(name: str, arch: str | None = None) -> int:
  col = list(ARCHES).index(arch or native_arch())
  table = dict(DENIED, clone=CLONE, clone3=CLONE3, **SOCKET)
  return table[name][col]


def filter_bytes(arch: str | None = None) -> bytes:
  """The compiled filter for `arch` (default: this machine's)."""
  arch = arch or native_arch()
  col = list(ARCHES).index(arch)
  eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
  eafnosupport = RET_ERRNO | errno.EAFNOSUPPORT
  prog: list[tuple] = []  # (code, jt, jf, k); jt/jf may name a label, resolved below

  def ins(code, k, jt=0, jf=0):
    prog.append((code, jt, jf, k))

  ins(_LD_W_ABS, _ARCH)
  ins(_JEQ_K, ARCHES[arch], jt=1)
  ins(_RET_K, RET_KILL_PROCESS)
  ins(_LD_W_ABS, _NR)
  if arch == "x86_64":  # x32 ABI: same arch value, numbers with bit 30 set
    ins(_JGE_K, X32_SYSCALL_BIT, jt="kill")
  for nrs in DENIED.values():
    ins(_JEQ_K, nrs[col], jt="eperm")
  ins(_JEQ_K, CLONE3[col], jt="enosys")
  ins(_JEQ_K, CLONE[col], jt="clone")
  for nrs in SOCKET.values():
    ins(_JEQ_K, nrs[col], jt="socket")
  ins(_RET_K, RET_ALLOW)
  # Both argument checks read arg0's low 32 bits (clone's flags and socket's
  # family are C ints / the kernel truncates them: high garbage hides nothing).
  arg0_lo = _ARG0_LO if struct.pack("=I", 1)[0] == 1 else _ARG0_LO + 4
  labels = {"clone": len(prog)}
  ins(_LD_W_ABS, arg0_lo)
  ins(_JSET_K, CLONE_NS_FLAGS, jt="eperm")
  ins(_RET_K, RET_ALLOW)
  labels["socket"] = len(prog)
  ins(_LD_W_ABS, arg0_lo)
  for family in ALLOWED_FAMILIES:
    ins(_JEQ_K, family, jt="allow")
  ins(_RET_K, eafnosupport)
  for name, ret in (("allow", RET_ALLOW), ("eperm", eperm), ("enosys", enosys),
                    ("kill", RET_KILL_PROCESS)):
    labels[name] = len(prog)
    ins(_RET_K, ret)

  out = []
  for i, (code, jt, jf, k) in enumerate(prog):
    jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
    if not 0 <= jt <= 255:
      raise AssertionError("BPF jump out of range: split the deny list")
    out.append(struct.pack("=HBBI", code, jt, jf, k))
  return b"".join(out)
