"""Shared fixtures: random checkpoints of the tiny config, written once per test session.

`tiny_original` and `tiny_hf` hold the SAME weights (same seed; every tensor depends only on the
seed and its name), in the official original/ layout and the Hugging Face layout respectively,
both with MXFP4 experts exactly as OpenAI ships them. Treat them as read-only: copy a directory
before changing anything in it. `tiny_config` is shared too: derive variants with
`dataclasses.replace(tiny_config, ...)`, never mutate it.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
import tempfile
from pathlib import Path

import openai
import pytest

# pytest-xdist runs test files in several processes at once. Each one's torch, and each command a
# test starts, would run one OpenMP thread per core, so N workers put N threads on every core and
# their spinning threads starve each other: on 2 cores, two copies of test_nano's held-out test
# ran >20 min with 2 threads each, ~310 s with 1 each. Share the cores out instead; a value the
# user set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _WORKERS)))

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch sizes its thread pool from it)

from ossgpt import ModelConfig, kernels
from ossgpt.checkpoint import write_random
from ossgpt.kernels import build
from ossgpt.server.subprocess import served

# `ossgpt serve` keeps stored responses in the user's data folder (--store's default): the
# servers tests start use a folder of this session's instead (platformdirs reads XDG_DATA_HOME).
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="ossgpt-test-data-")

TINY_SEED = 0
# Third-party test data (openai/harmony's goldens, openai/gpt-oss's compatibility cases): the
# shared folder beside the repository, or $OSSGPT_SHARED; see its peer-data/SOURCES.md.
SHARED = Path(os.environ.get("OSSGPT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
PEER_DATA = SHARED / "peer-data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about a minute (deselect with -m 'not slow')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first, the rest in their usual order. Workers take whole
    files (--dist loadfile) in this order, so the long files start at once on different workers
    instead of one of them running last while the other workers sit idle."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    """The `tiny` preset: 4 layers (sliding, full, sliding, full; window 128), 4 experts with
    2 active, hidden 64, 4 query / 2 key-value heads of dim 16, the real 201088 vocabulary."""
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> Path:
    """Directory of a random tiny checkpoint in the official original/ layout
    (config.json, dtypes.json, model.safetensors)."""
    directory = tmp_path_factory.mktemp("tiny_original")
    write_random(directory, tiny_config, fmt="original", seed=TINY_SEED, progress=False)
    return directory


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> Path:
    """Directory of the same random weights in the Hugging Face layout (config.json with
    model_type gpt_oss and an mxfp4 quantization_config, sharded safetensors + index)."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    write_random(directory, tiny_config, fmt="hf", seed=TINY_SEED, progress=False)
    return directory


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_original: Path, tiny_hf: Path) -> Path:
    """A hub-snapshot-shaped directory: the HF layout at the root plus `original/`."""
    root = tmp_path_factory.mktemp("tiny_repo")
    for f in tiny_hf.iterdir():
        shutil.copy2(f, root / f.name)
    shutil.copytree(tiny_original, root / "original")
    return root


@pytest.fixture(params=[level for level in build.all_levels() if level != build.PLAIN])
def isa(request) -> str:
    """Each CPU kernel level of this architecture in turn (x86-64: avx2, avx512, avx512bf16;
    aarch64: neon), active for the test; skipped, with the reason, where this CPU cannot run it
    or there is no compiler. The plain path is what the tests compare them with."""
    level = request.param
    if level not in build.supported_levels():
        pytest.skip(f"this CPU cannot run {level}")
    if build.build(level) is None:
        pytest.skip(f"the CPU kernels for {level} do not compile here")
    with kernels.use_isa(level):
        yield level


@pytest.fixture(scope="session")
def unequal_prompts(tiny_config: ModelConfig) -> list[list[int]]:
    """Six seeded prompts of 150, 37, 1, 129, 90 and 5 tokens: a batch with left padding, the
    longest past the tiny config's 128-token sliding window."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, tiny_config.vocab_size, (n,), generator=g).tolist()
            for n in (150, 37, 1, 129, 90, 5)]


@torch.inference_mode()
def _decode_logits(net, prompts: list[list[int]], steps: int = 6) -> torch.Tensor:
    from ossgpt.generate import decode_step, prefill
    cache = net.make_cache()
    out = [prefill(net, prompts, cache)]
    positions = torch.tensor([len(p) for p in prompts], device=net.device)
    tokens = torch.randint(0, net.config.vocab_size, (steps, len(prompts)),
                           generator=torch.Generator().manual_seed(2)).to(net.device)
    for i in range(steps):
        out.append(decode_step(net, tokens[i], positions + i, cache))
    return torch.stack(out).cpu()


@pytest.fixture(scope="session")
def decode_logits():
    """f(net, prompts, steps=6) -> float32 logits (steps + 1, B, V) on the CPU: the prefill's
    last, then `steps` decode steps of fixed seeded tokens (not the argmax: near-tied random
    logits would send two paths apart)."""
    return _decode_logits


@pytest.fixture
def cli_error(capsys):
    """f(*argv) -> the one `error: ...` line that `ossgpt ARGV` fails with (exit status 1, no
    traceback)."""
    from ossgpt.cli import main

    def run(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        assert info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        return err

    return run


# -- a real server on a loopback port ------------------------------------------------------------

def run_server(*args: str, timeout: float = 120.0):
    """`ossgpt serve ARGS` (nano unless --model is given) on a free loopback port in a
    subprocess: a context manager yielding its base URL."""
    return served(*args, timeout=timeout)


@pytest.fixture(scope="session")
def nano_server() -> str:
    """Base URL of one `ossgpt serve` of nano shared by the server tests (float32, so greedy
    output is comparable with the Python API's)."""
    with run_server("--dtype", "float32", "--max-model-len", "4096") as url:
        yield url


@pytest.fixture(scope="session")
def client(nano_server: str) -> openai.OpenAI:
    """The real `openai` client on `nano_server`."""
    return openai.OpenAI(base_url=nano_server + "/v1", api_key="unused", max_retries=0)
