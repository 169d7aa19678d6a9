"""One memory cgroup per sandbox slot, where the harness may create cgroups.

RLIMIT_AS bounds each process's address space; a memory cgroup bounds what the
whole sandbox (checker, candidates, their tmpfs pages, pipe and socket buffers,
kernel objects) holds at once, and the kernel OOM-kills inside it instead of
the host running out. Created when the harness can write to the cgroup tree:

* cgroup v1 (and hybrid hosts): a child of the harness's own memory cgroup,
  `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes`: no swap escape).
  v1 charges socket buffers (TCP and UDP) to a counter of their own, and only
  once `memory.kmem.tcp.limit_in_bytes` is set: the cap is split, 1/16 for
  socket buffers, the rest for everything else, so the two together stay
  within the cap. Where that file is missing `socket_memory_charged` is False;
* cgroup v2: a sibling of the harness's cgroup whose parent delegates the memory
  controller (v2 forbids children of a cgroup that holds processes, like ours),
  `memory.max` and `memory.swap.max = 0` (v2 charges socket buffers to
  memory.current: nothing to split).

Typically root has that access and an unprivileged user does not (unless
systemd delegated it a subtree). Where neither works `SlotCgroups.create`
returns None and the caller logs a warning: memory is then bounded per process
only (RLIMIT_AS x max_procs), the seccomp filter closing the ways around
RLIMIT_AS we know of (shm, memfd, private tmpfs mounts).

A sandbox enters its cgroup through `sh -c 'echo $$ > cgroup.procs; exec ...'`
before bwrap starts, so every process it creates is inside (no preexec_fn: the
harness is multi-threaded).
"""
from __future__ import annotations

import os

_PREFIX = "restem-sandbox-"
TCP_SHARE = 16  # cgroup v1: 1/16 of a slot's cap for socket buffers, the rest for the others


def _own_cgroups() -> dict[str, str]:
  """controller ("" for v2) -> path of this process's cgroup, from /proc/self/cgroup."""
  out = {}
  with open("/proc/self/cgroup") as f:
    for line in f:
      _, controllers, path = line.rstrip("\n").split(":", 2)
      for c in controllers.split(",") if controllers else [""]:
        out[c] = path
  return out


def _mounts() -> list[tuple[str, str, str, set[str]]]:
  """(fstype, hierarchy root, mount point, super options) of cgroup mounts."""
  out = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      pre, post = line.split(" - ", 1)
      fields, (fstype, _, opts) = pre.split(), post.split()[:3]
      if fstype in ("cgroup", "cgroup2"):
        out.append((fstype, fields[3], fields[4], set(opts.split(","))))
  return out


def _dir_of(mount_root: str, mount_point: str, path: str) -> str | None:
  if mount_root != "/" and not (path + "/").startswith(mount_root.rstrip("/") + "/"):
    return None  # our cgroup is outside what this mount shows
  rel = path[len(mount_root):] if mount_root != "/" else path
  return os.path.join(mount_point, rel.lstrip("/"))


def _write(path: str, value: str) -> None:
  with open(path, "w") as f:
    f.write(value)


def _remove_stale(base: str) -> None:
  """Slot cgroups left by a harness that died: empty once its sandboxes are gone."""
  try:
    names = os.listdir(base)
  except OSError:
    return
  for name in names:
    pid = name[len(_PREFIX):].split("-")[0]
    if name.startswith(_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
      group = os.path.join(base, name)
      for sub in os.listdir(group) if os.path.isdir(group) else []:
        if os.path.isdir(os.path.join(group, sub)):
          try:
            os.rmdir(os.path.join(group, sub))
          except OSError:
            pass
      try:
        os.rmdir(group)
      except OSError:
        pass


class SlotCgroups:
  """Memory cgroups `<base>/restem-sandbox-<pid>-<tag>/slot<i>`, one per sandbox slot."""

  def __init__(self, group: str, version: int, num_slots: int):
    self.group = group
    self.version = version
    self.dirs = [os.path.join(group, f"slot{i}") for i in range(num_slots)]
    # Whether the kernel charges socket buffers against the cap (see module doc).
    self.socket_memory_charged = version == 2

  @classmethod
  def create(cls, num_slots: int, limit_bytes: int, tag: str) -> tuple[SlotCgroups | None, str]:
    """(cgroups, "") or (None, why not)."""
    try:
      own, mounts = _own_cgroups(), _mounts()
    except OSError as e:
      return None, f"cannot read /proc/self/cgroup or mountinfo ({e})"
    bases = []  # (version, directory to create our group in)
    for fstype, root, point, opts in mounts:
      if fstype == "cgroup" and "memory" in opts and "memory" in own:
        d = _dir_of(root, point, own["memory"])
        if d:
          bases.append((1, d))
    for fstype, root, point, _ in mounts:
      if fstype == "cgroup2" and "" in own:
        d = _dir_of(root, point, own[""])
        if d:
          bases += [(2, d), (2, os.path.dirname(d.rstrip("/")))]
    why = [] if bases else ["no cgroup hierarchy with the memory controller"]
    for version, base in bases:
      if version == 2:
        try:
          with open(os.path.join(base, "cgroup.subtree_control")) as f:
            if "memory" not in f.read().split():
              why.append(f"{base} does not delegate the memory controller (cgroup v2)")
              continue
        except OSError as e:
          why.append(f"{base}: {e.strerror}")
          continue
      _remove_stale(base)
      group = os.path.join(base, f"{_PREFIX}{os.getpid()}-{tag}")
      self = cls(group, version, num_slots)
      try:
        os.mkdir(group)
        if version == 2:
          _write(os.path.join(group, "cgroup.subtree_control"), "+memory")
        for d in self.dirs:
          os.mkdir(d)
          self._limit(d, limit_bytes)
        return self, ""
      except OSError as e:
        why.append(f"cannot create a memory cgroup under {base} ({e.strerror or e})")
        self.close()
    return None, "; ".join(why)

  def _limit(self, d: str, limit_bytes: int) -> None:
    if self.version == 1:
      tcp = limit_bytes // TCP_SHARE
      try:
        _write(os.path.join(d, "memory.kmem.tcp.limit_in_bytes"), str(tcp))
        self.socket_memory_charged = True
      except OSError:  # kernel without v1 socket accounting: the whole cap for the rest
        tcp = 0
      _write(os.path.join(d, "memory.limit_in_bytes"), str(limit_bytes - tcp))
      optional = [("memory.memsw.limit_in_bytes", str(limit_bytes - tcp))]
    else:
      _write(os.path.join(d, "memory.max"), str(limit_bytes))
      optional = [("memory.swap.max", "0")]
    for name, value in optional:  # absent without swap accounting
      try:
        _write(os.path.join(d, name), value)
      except OSError:
        pass

  def wrap(self, slot: int, argv: list[str]) -> list[str]:
    """argv, started inside the slot's cgroup."""
    procs = os.path.join(self.dirs[slot], "cgroup.procs")
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

  def peak_bytes(self, slot: int) -> int | None:
    """The slot's peak memory since it was created (None if the kernel has no counter)."""
    name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
    try:
      with open(os.path.join(self.dirs[slot], name)) as f:
        return int(f.read())
    except (OSError, ValueError):
      return None

  def close(self) -> None:
    """Remove the cgroups (their processes are gone: the sandboxes ended)."""
    for d in self.dirs + [self.group]:
      try:
        os.rmdir(d)
      except OSError:
        pass
