"""Choosing and building the CPU kernels (ossgpt/kernels/build.py): the level this CPU can run,
OSSGPT_ISA forcing a lower one, builds never loaded on a CPU that lacks their level, and a
failed build saying why in one line and falling back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from ossgpt import kernels
from ossgpt.kernels import build

# /proc/cpuinfo flags of an AMD EPYC 7R13 (Zen 3): AVX2, no AVX-512
ZEN3_FLAGS = set("""fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse
    sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid
    extd_apicid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe
    popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse
    3dnowprefetch topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms
    invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr rdpru
    wbnoinvd arat npt nrip_save vaes vpclmulqdq rdpid""".split())


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.parametrize("level", build.all_levels())
def test_forcing_a_level_runs_that_level(level):
    """OSSGPT_ISA=<level> on a CPU that has more gives that level's build, by its name and by
    what it was compiled for; plain gives none."""
    if level not in build.supported_levels():
        pytest.skip(f"this CPU cannot run {level}")
    out = _run("from ossgpt import kernels\n"
               "ext = kernels.cpu_kernels()\n"
               "print(kernels.isa(), ext and ext.level(), ext and ext.__name__)", OSSGPT_ISA=level)
    assert out.returncode == 0, out.stderr
    isa, compiled, name = out.stdout.split()
    assert isa == level
    if level == build.PLAIN:
        assert compiled == name == "None"
    else:
        assert compiled == level and name.startswith(f"ossgpt_cpu_{level}_")


def test_builds_are_named_by_level():
    names = {level: build.extension_name(level) for level in build.all_levels()[1:]}
    assert all(name.startswith(f"ossgpt_cpu_{level}_") for level, name in names.items())
    assert len(set(names.values())) == len(names)


def _without_chosen(monkeypatch):
    monkeypatch.setattr(kernels, "_chosen", None)


@pytest.mark.skipif(build.architecture() != "x86_64", reason="an x86-64 CPU's levels")
def test_a_cpu_without_avx512_never_loads_an_avx512_build(monkeypatch, capsys):
    """A build cache shared with an AVX-512 machine (a cluster's home directory): on a CPU with
    AVX2 only, the avx512bf16 build in the cache is never loaded, by default or when asked for."""
    for level in ("avx512", "avx512bf16"):     # put them in the cache where this CPU can build them
        if level in build.supported_levels():
            assert build.build(level) is not None
    monkeypatch.setattr(build, "cpu_features", lambda: ZEN3_FLAGS)
    assert build.supported_levels() == ["plain", "avx2"]
    for asked in ("", "avx512bf16", "avx512"):
        monkeypatch.setenv("OSSGPT_ISA", asked)
        _without_chosen(monkeypatch)
        assert kernels.cpu_kernels().level() == "avx2" and kernels.isa() == "avx2"
        if asked:
            assert f"this CPU cannot run {asked} (OSSGPT_ISA); using avx2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot run avx512bf16"):
        with kernels.use_isa("avx512bf16"):
            pass


def test_a_cpu_with_no_level_runs_the_plain_path(monkeypatch):
    monkeypatch.setattr(build, "cpu_features", lambda: {"fpu", "sse2"})
    monkeypatch.delenv("OSSGPT_ISA", raising=False)
    _without_chosen(monkeypatch)
    assert build.supported_levels() == ["plain"]
    assert kernels.cpu_kernels() is None and kernels.isa() == "plain"


def test_an_unknown_level_is_named_and_the_best_runs():
    out = _run("from ossgpt import kernels; print(kernels.isa())", OSSGPT_ISA="sse9")
    best = build.supported_levels()[-1]
    assert out.stdout.strip() == best
    assert f"ossgpt: OSSGPT_ISA=sse9 is not one of {', '.join(build.all_levels())}; using {best}" in out.stderr


def test_a_failed_build_says_why_in_one_line_and_falls_back(tmp_path):
    """A compiler that fails (here: one that is not there) costs one line per level tried, no
    traceback, and the plain path runs."""
    out = _run("from ossgpt import kernels; print(kernels.isa())", CXX=str(tmp_path / "no-such-c++"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), OSSGPT_ISA="")
    assert out.returncode == 0 and out.stdout.strip() == "plain"
    lines = out.stderr.strip().splitlines()
    best = build.supported_levels()[-1]
    if best == build.PLAIN:
        assert lines == []
        return
    assert lines == [f"ossgpt: CPU kernels for {best} did not compile (no C++ compiler: "
                     f"{tmp_path / 'no-such-c++'} is not on PATH)",
                     "ossgpt: running the plain PyTorch path (slower)"]


def test_disabled_by_environment():
    out = _run("from ossgpt import kernels; print(kernels.cpu_kernels() is None, kernels.isa())",
               OSSGPT_KERNELS="0")
    assert out.stdout.split() == ["True", "plain"]


def test_sources_are_compiled_from_a_copy_in_the_build_folder(tmp_path, monkeypatch):
    """One path for every checkout of the same sources: none recompiles because another built
    from elsewhere."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    paths = build.staged_sources("avx2")
    assert [p.name for p in paths] == list(build.SOURCES)
    src = paths[0].parent
    assert src.parent == build.build_directory("avx2") and tmp_path in src.parents
    originals = {p.name: p.read_bytes() for p in build.CPU_DIR.iterdir() if p.suffix in (".cpp", ".h")}
    assert {p.name: p.read_bytes() for p in src.iterdir()} == originals      # headers too, no temp files
    stamps = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    build.staged_sources("avx2")
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == stamps    # unchanged: not rewritten


def test_each_torch_installation_has_its_own_build(monkeypatch):
    """The build's commands name torch's include folder: two virtual environments sharing a
    build folder recompiled in turn, minutes each on a slow CPU. Each keys its own."""
    here = build.extension_name("avx2")
    monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    assert build.extension_name("avx2") != here


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build.build_directory("avx2") / "lock"
    lock.touch()
    build.clear_stale_lock("avx2")
    assert lock.exists() and capsys.readouterr().err == ""                   # a build in progress
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    build.clear_stale_lock("avx2")
    assert not lock.exists()
    assert "removing a stale build lock" in capsys.readouterr().err


def test_another_ninja_first_on_path_does_not_recompile():
    """The build's own ninja runs whatever PATH holds: a system ninja of another version first on
    PATH (/usr/bin's 1.11 beside the package's 1.13) once found every build "changed" and
    recompiled it, a minute each time, whenever processes with different PATHs took turns."""
    ext = kernels.cpu_kernels()
    if ext is None:
        pytest.skip("no kernels build on this machine")
    level = ext.level()
    library = next(build.build_directory(level).glob(f"{build.extension_name(level)}.*"))
    stamps = []
    for first in (build.ninja_folder() or "", "/usr/bin"):     # the package's ninja, a system one
        out = _run("from ossgpt import kernels; print(kernels.cpu_kernels().level())",
                   PATH=os.pathsep.join([first, "/usr/bin", "/bin", os.environ.get("PATH", "")]),
                   OSSGPT_ISA=level)
        assert out.returncode == 0 and out.stdout.strip() == level, out.stderr
        assert "compiling" not in out.stderr
        stamps.append(library.stat().st_mtime_ns)
    assert stamps[0] == stamps[1]
