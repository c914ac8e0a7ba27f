"""Which CPU kernels run here, and building them.

The C++ in ossgpt/kernels/cpu is written once against a small vector layer (cpu/simd.h) and
compiled once per instruction-set level, each build its own extension named after the level
and a digest of what went into it:

    avx2        AVX2 + FMA + F16C (most x86-64 CPUs since 2013-2015)
    avx512      AVX-512 F/BW/VL/DQ (Skylake-SP to Ice Lake servers)
    avx512bf16  AVX-512 with BF16 (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and 5)
    neon        aarch64 Advanced SIMD (Apple silicon, Graviton, Ampere, Raspberry Pi 4 and 5)

At run time the best level this CPU can execute is chosen (`OSSGPT_ISA=plain|avx2|avx512|
avx512bf16|neon` forces a lower one; `plain`, or `OSSGPT_KERNELS=0`, runs the plain PyTorch
path). Builds never use -march=native, so a build cache shared by machines (a home directory on a
cluster) holds one build per level, and a machine only ever loads a level it can run. A build is
compiled on first use (about a minute, said on stderr) into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR); a build that fails says why in one line and
the next level down is tried.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

CPU_DIR = Path(__file__).parent / "cpu"
SOURCES = ("bindings.cpp", "moe.cpp", "linear.cpp", "layer.cpp")
PLAIN = "plain"

# Per architecture, the levels in ascending order; the compiler flags of each and the CPU
# features it needs (as Linux's /proc/cpuinfo names them).
_X86 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_X86, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
LEVELS: dict[str, tuple[str, ...]] = {"x86_64": ("avx2", "avx512", "avx512bf16"), "aarch64": ("neon",)}
FLAGS: dict[str, list[str]] = {"avx2": _X86, "avx512": _AVX512, "avx512bf16": [*_AVX512, "-mavx512bf16"],
                               "neon": ["-march=armv8-a"]}
FEATURES: dict[str, set[str]] = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
    "neon": {"asimd"},
}

_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def architecture() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def all_levels() -> tuple[str, ...]:
    """plain, then this architecture's levels, ascending."""
    return (PLAIN, *LEVELS.get(architecture(), ()))


def cpu_features() -> set[str] | None:
    """The CPU's feature flags as Linux names them, or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    if sys.platform == "darwin":
        if architecture() == "aarch64":
            return {"asimd"}                       # every Apple silicon CPU
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return {f.lower() for f in out.split()}    # AVX2, FMA, F16C, AVX512F, ... (no Mac has BF16)
    return None


def supported_levels() -> list[str]:
    """The levels this CPU can execute, ascending, plain first."""
    features = cpu_features()
    levels = [PLAIN]
    for level in LEVELS.get(architecture(), ()):
        if features is not None:
            ok = FEATURES[level] <= features
        else:   # no feature list: what PyTorch's own CPU detection vouches for (never BF16)
            capability = torch.backends.cpu.get_cpu_capability()
            ok = (level == "neon" or level == "avx2" and capability in ("AVX2", "AVX512")
                  or level == "avx512" and capability == "AVX512")
        if ok:
            levels.append(level)
    return levels


def chosen_level() -> tuple[str, str | None]:
    """(the level to run, a one-line note when OSSGPT_ISA / OSSGPT_KERNELS asked for another)."""
    supported = supported_levels()
    if os.environ.get("OSSGPT_KERNELS", "1") == "0":
        return PLAIN, None
    asked = os.environ.get("OSSGPT_ISA", "").strip().lower()
    if not asked:
        return supported[-1], None
    if asked not in all_levels():
        return supported[-1], (f"OSSGPT_ISA={asked} is not one of {', '.join(all_levels())}; "
                               f"using {supported[-1]}")
    if asked not in supported:
        return supported[-1], f"this CPU cannot run {asked} (OSSGPT_ISA); using {supported[-1]}"
    return asked, None


def extension_name(level: str) -> str:
    """The build's name: its level and a digest of its sources, flags, compiler and torch (its
    version and where it is installed: the build's commands name torch's include folder, so
    two virtual environments sharing one build folder would each recompile the other's)."""
    h = hashlib.sha1()
    for p in sorted(CPU_DIR.iterdir()):
        if p.suffix in (".cpp", ".h"):
            h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join(_cflags(level)).encode() + torch.__version__.encode()
             + os.path.dirname(torch.__file__).encode() + compiler().encode()
             + (ninja_folder() or "").encode())
    return f"ossgpt_cpu_{level}_{h.hexdigest()[:12]}"


def _cflags(level: str) -> list[str]:
    flags = ["-O3", "-std=c++17", *FLAGS[level]]
    if sys.platform != "darwin":     # Apple's clang has no OpenMP; torch's threads then run serially
        flags.append("-fopenmp")
    return flags


def build_directory(level: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(extension_name(level), verbose=False))


STALE_LOCK_SECONDS = 600    # a build takes about a minute; an older lock's builder was killed


def staged_sources(level: str) -> list[Path]:
    """The sources copied into the build's own folder, and the paths to compile.

    Why: torch's builder records the sources' absolute paths, so two checkouts of the same
    version run from one environment (same digest, same build folder) would each find the
    other's paths and recompile. Copies in the build folder have one path for all of them."""
    src = build_directory(level) / "src"
    src.mkdir(parents=True, exist_ok=True)
    for p in CPU_DIR.iterdir():
        if p.suffix in (".cpp", ".h"):
            target = src / p.name
            data = p.read_bytes()
            if not target.is_file() or target.read_bytes() != data:
                tmp = target.with_name(f".{p.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, target)          # whole or not at all, under concurrent builders
    return [src / s for s in SOURCES]


def clear_stale_lock(level: str) -> None:
    """torch's builder waits, forever and silently, while its lock file exists; a builder killed
    mid-build (SIGKILL, a closed terminal) leaves it behind. Remove one older than any build."""
    lock = build_directory(level) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"ossgpt: removing a stale build lock ({lock}, {age / 60:.0f} minutes old)", file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)


def is_built(level: str) -> bool:
    name = extension_name(level)
    return any((build_directory(level) / f"{name}{suffix}").is_file() for suffix in (".so", ".pyd"))


def compiler() -> str:
    """The C++ compiler torch's extension builder runs."""
    return os.environ.get("CXX", "c++")


def ninja_folder() -> str | None:
    """The folder of the ninja that builds (and names) the extension: the `ninja` package's (a
    requirement of ossgpt), else the first on PATH. Why one ninja: torch runs whichever is first
    on PATH, and two versions (the package's 1.13, a system's 1.11) hash the commands they log
    differently, so each finds the other's build "changed" and recompiles all of it, silently:
    seen every minute or two under the test suite, whose subprocesses differ in PATH."""
    try:
        import ninja
        return ninja.BIN_DIR
    except (ImportError, AttributeError):
        found = shutil.which("ninja")
        return os.path.dirname(found) if found else None


def have_compiler() -> bool:
    return shutil.which(compiler()) is not None


def _one_line(error: Exception) -> str:
    """The compiler's first error line, or the exception's last line."""
    text = str(error)
    for line in text.splitlines():
        if re.search(r"\berror\b", line) and not line.startswith(("FAILED", "ninja:")):
            return line.strip()[:300]
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__).strip()[:300]


def build(level: str) -> ModuleType | None:
    """The extension for `level` (compiled if not cached), or None where it does not compile.
    The caller makes sure this CPU can run the level."""
    with _lock:
        if level in _built:
            return _built[level]
        module = None
        try:
            from torch.utils.cpp_extension import load
            if not is_built(level) and not have_compiler():
                raise RuntimeError(f"no C++ compiler: {compiler()} is not on PATH")
            if not is_built(level):
                print(f"ossgpt: compiling CPU kernels for {level}, once (about a minute; cached in "
                      f"{build_directory(level).parent})", file=sys.stderr, flush=True)
            clear_stale_lock(level)
            path = os.environ.get("PATH")
            if folder := ninja_folder():
                os.environ["PATH"] = os.pathsep.join([folder, *([path] if path else [])])
            try:
                module = load(name=extension_name(level), sources=[str(p) for p in staged_sources(level)],
                              extra_cflags=_cflags(level),
                              extra_ldflags=[] if sys.platform == "darwin" else ["-fopenmp"], verbose=False)
            finally:
                if path is None:
                    os.environ.pop("PATH", None)
                else:
                    os.environ["PATH"] = path
            if module.level() != level:    # the compiler ignored the level's flags
                raise RuntimeError(f"the build is for {module.level()}, not {level}")
        except Exception as e:  # no compiler, too old a compiler: a lower level or the plain path
            print(f"ossgpt: CPU kernels for {level} did not compile ({_one_line(e)})", file=sys.stderr, flush=True)
            module = None
        _built[level] = module
        return module
