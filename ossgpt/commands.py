"""The CLI's commands: typed functions whose signatures are their options (see cli.py).
Heavy imports happen inside each function, so `ossgpt --help` stays quick."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable

from .errors import OssgptError

DTYPES = ("bfloat16", "float32", "float16")


Range = tuple[Callable[[float], bool], str]   # the test, and how an error message says it


def _at_least(low: int) -> Range:
    return lambda x: low <= x < math.inf, f">= {low}"


def _above(low: float) -> Range:
    return lambda x: low < x < math.inf, f"> {low}"


# The allowed values of the numeric options, by name: a name means the same in every command.
# cli.main checks them before a command runs, so a bad number is one error line, not a traceback
# or a silent default; NaN and infinity fail every check.
RANGES: dict[str, Range] = {
    "max_tokens": _at_least(1), "temperature": _at_least(0), "top_k": _at_least(0),
    "top_p": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "port": (lambda x: 1 <= x <= 65535, "in [1, 65535]"),
    "max_batch": _at_least(1), "max_queue": _at_least(1), "max_model_len": _at_least(2),
    "layers": _at_least(1), "steps": _at_least(1), "n": _at_least(1), "lr": _above(0),
    "batch_tokens": _at_least(1), "micro_batch_tokens": _at_least(1), "lora_rank": _at_least(1),
    "lora_alpha": _above(0), "epochs": _above(0), "val_split": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "prompt_tokens": _at_least(1), "decode_steps": _at_least(1), "repeats": _at_least(1),
    "limit": _at_least(1), "prefix_cache_gb": _at_least(0), "prefill_chunk": _at_least(1),
}


def _load(model: str, device: str, dtype: str, pack_dense: bool = True, verbose: bool = False,
          experts_device: str | None = None, parallel: bool = False):
    """The model for a command; inference commands keep its dense weights packed on the CPU
    (packed_bf16.py: lossless, faster decode), training and merging need them plain. `verbose`
    says where it runs: device, threads, and the CPU kernels' instruction-set level.
    `parallel`: under torchrun, this process's share of the model (ossgpt.parallel)."""
    import torch

    from . import kernels, parallel as par
    from .checkpoint import load, resolve
    from .checkpoint.load import resolve_device

    if dtype not in DTYPES:
        raise OssgptError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    place, layers = _experts_device(experts_device)
    directory, fmt = resolve(model)
    shard = par.from_environment(resolve_device(device)) if parallel else None
    if shard is None or shard.rank == 0:
        print(f"Loading {directory} ({fmt} layout)", file=sys.stderr, flush=True)
    net = load(directory, device=device, dtype=getattr(torch, dtype),
               progress=shard is None or shard.rank == 0, pack_dense=pack_dense,
               experts_device=place, experts_layers=layers, shard=shard)
    if shard is not None:
        print(shard.describe(net), file=sys.stderr, flush=True)
    if verbose:
        where = (f"cpu, {torch.get_num_threads()} threads, CPU kernels {kernels.isa()}"
                 if net.device.type == "cpu" else str(net.device))
        print(f"Running on {where}; {dtype}", file=sys.stderr, flush=True)
    return net


def _one_process(command: str) -> None:
    from .parallel import under_torchrun
    if under_torchrun():
        raise OssgptError(f"{command} runs in one process; under torchrun run generate or bench")


def _experts_device(spec: str | None) -> tuple[str | None, int | None]:
    """--experts-device: "cpu" (every layer's experts) or "cpu:N" (the first N layers')."""
    if spec is None:
        return None, None
    device, _, layers = spec.partition(":")
    if device != "cpu" or layers and not layers.isdigit():
        raise OssgptError(f"--experts-device wants cpu or cpu:N (the first N layers' experts), got {spec!r}")
    return device, int(layers) if layers else None


def _read_steers(steer: str | None) -> list:
    """--steer FILE:LAYER:SCALE[,...], read before the model loads so a bad one fails fast."""
    from .inspect.steering import read_specs

    return read_specs([s.strip() for s in (steer or "").split(",") if s.strip()])


@contextlib.contextmanager
def _steered(net, steers: list):
    """`net` steered by `steers` (from _read_steers) while the context is active, said on stderr."""
    from .inspect.steering import steering

    with steering(net, steers):
        for s in steers:
            print(s, file=sys.stderr, flush=True)
        yield


def _read_stdin_prompt() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()


def generate(model: str = "nano", prompt: str | None = None, max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, device: str = "auto", dtype: str = "bfloat16",
             steer: str | None = None, experts_device: str | None = None) -> None:
    """Complete raw text (no chat format), streaming it to stdout. Under torchrun the model is
    split over the processes (experts and attention heads; process 0 prints).

    model: nano (bundled), a checkpoint directory (original/ or Hugging Face layout) or hub id
    prompt: the text to continue; read from stdin when omitted
    max_tokens: most tokens to generate
    temperature: 0 for greedy
    top_p: nucleus sampling mass
    top_k: sample among the k most likely tokens (0: all)
    seed: random seed, for reproducible sampling
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16
    steer: a steering vector added to the residual stream, FILE:LAYER:SCALE (made by `ossgpt inspect steer`; LAYER empty: the file's own); several comma-separated
    experts_device: where the experts live if not on --device: cpu (beside a GPU; the CPU kernels run them) or cpu:N (the first N layers' experts)"""
    from .generate import generate as run
    from .sampling import SamplingParams
    from .tokenizer import IncrementalDecoder, Tokenizer, get_tokenizer

    prompt = prompt if prompt is not None else _read_stdin_prompt()
    if not prompt:
        raise OssgptError("no prompt: pass --prompt TEXT or pipe text on stdin")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    steers = _read_steers(steer)
    net = _load(model, device, dtype, experts_device=experts_device, parallel=True)
    tokenizer = get_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    stops = (Tokenizer.ENDOFTEXT, Tokenizer.RETURN)
    shard = getattr(net, "shard", None)
    if shard is not None and shard.rank:
        sys.stdout = open(os.devnull, "w")     # every process generates; one prints
    with _steered(net, steers):
        sys.stdout.write(prompt)
        for event in run(net, [tokenizer.encode(prompt)], max_tokens, sampling, stops):
            if event.token not in stops:
                sys.stdout.write(decoder.push(event.token))
                sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")


def chat(model: str = "nano", reasoning_effort: str = "medium", system: str | None = None,
         developer: str | None = None, tools: str | None = None, show_reasoning: bool = False,
         max_tokens: int = 4096, temperature: float = 1.0, top_p: float = 1.0,
         seed: int | None = None, device: str = "auto", dtype: str = "bfloat16",
         verbose: bool = False, steer: str | None = None, corpus: str | None = None,
         search_url: str | None = None, python_unsandboxed: bool = False,
         experts_device: str | None = None) -> None:
    """Chat in the harmony format; reads one prompt from stdin when it is not a terminal.

    model: nano (bundled), a checkpoint directory (original/ or Hugging Face layout) or hub id
    reasoning_effort: low, medium or high
    system: replaces the model identity line of the system message
    developer: developer instructions
    tools: comma-separated: "browser" (gpt-oss's built-in browser over --corpus or the web), "python" (its built-in python notebook), "demo" (get_weather, convert_units, run locally), or a JSON file of function tools (you type their results)
    show_reasoning: print the model's reasoning (dimmed) before its answer
    max_tokens: most tokens per reply
    temperature: 0 for greedy
    top_p: nucleus sampling mass
    seed: random seed, for reproducible sampling
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16
    verbose: say where it runs (device, threads, the CPU kernels' instruction set)
    steer: a steering vector added to the residual stream, FILE:LAYER:SCALE (made by `ossgpt inspect steer`; LAYER empty: the file's own); several comma-separated
    corpus: the browser's documents: a folder of .md, .txt, .html and .pdf files, indexed on first use (with nano: its bundled corpus by default)
    search_url: the browser searches the web through this SearXNG-style JSON endpoint (.../search) instead of --corpus
    python_unsandboxed: run the python tool's code without its sandbox (your own machine, your own risk)
    experts_device: where the experts live if not on --device: cpu (beside a GPU; the CPU kernels run them) or cpu:N (the first N layers' experts)"""
    from .chat import ChatSession, ChatTools, run_repl
    from .sampling import SamplingParams

    _one_process("chat")

    if reasoning_effort not in ("low", "medium", "high"):
        raise OssgptError(f"--reasoning-effort must be low, medium or high, got {reasoning_effort!r}")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    specs = [t.strip() for t in (tools or "").split(",") if t.strip()]
    functions = [t for t in specs if t not in ("browser", "python")]
    if len(functions) > 1:
        raise OssgptError(f"--tools: one function-tool source at most (demo or a JSON file), got {functions}")
    tool_defs, run_function = _tools(functions[0] if functions else None)
    if "browser" in specs and model == "nano" and not corpus and not search_url:
        # nano learned the browser on its bundled corpus (benchmarks/finetune_nano_tools.py), so
        # `ossgpt chat --tools browser,python` shows it working with no folder to hand.
        from .data.builtin_tools import CORPUS_DIR
        corpus = str(CORPUS_DIR)
    toolbox = ChatTools(run_function,
                        _browser(corpus, search_url) if "browser" in specs else None,
                        _python_tool(python_unsandboxed) if "python" in specs else None)
    if not specs:
        run_tool = None
    elif run_function is None and functions and not toolbox.builtin_tools:
        run_tool = None  # a JSON file of tools: the user types their results
    else:
        run_tool = toolbox
    scripted = _read_stdin_prompt()
    steers = _read_steers(steer)
    net = _load(model, device, dtype, verbose=verbose, experts_device=experts_device)
    session = ChatSession(net, reasoning_effort=reasoning_effort, system=system,
                          developer=developer, tools=tool_defs, sampling=sampling,
                          max_tokens=max_tokens, builtin_tools=toolbox.builtin_tools)
    try:
        with _steered(net, steers):
            run_repl(session, show_reasoning=show_reasoning, scripted_prompt=scripted,
                     run_tool=run_tool)
    finally:
        toolbox.close()


def _browser(corpus: str | None, search_url: str | None):
    """--tools browser: a BrowserTool over --corpus or --search-url."""
    from .tools.browser import BrowserTool

    if not corpus and not search_url:
        raise OssgptError("--tools browser needs --corpus DIR (a folder of documents) "
                          "or --search-url URL (a SearXNG-style JSON search endpoint)")
    return BrowserTool(_browser_backend(corpus, search_url))


def _browser_backend(corpus: str | None, search_url: str | None):
    """The browser's backend: a local folder (--corpus) or the web (--search-url)."""
    if corpus and search_url:
        raise OssgptError("--corpus and --search-url: give one (a folder, or a search endpoint)")
    from .tools.browser import BackendError, LocalCorpus, WebBackend

    if search_url:
        return WebBackend(search_url)
    try:
        backend = LocalCorpus(corpus)
    except ImportError as e:
        raise OssgptError(f"the browser's local corpus needs {e.name}: "
                          "pip install bm25s") from None
    except BackendError as e:
        raise OssgptError(f"--corpus: {e}") from None
    what = "indexed" if backend.built else "index loaded for"
    print(f"browser: {what} {len(backend.paths)} documents in {backend.root}", file=sys.stderr)
    for note in backend.notes:
        print(f"browser: {note}", file=sys.stderr)
    return backend


def _python_tool(unsandboxed: bool):
    """--tools python: the sandboxed notebook (it refuses to run code, saying why, where this
    machine cannot sandbox it and --python-unsandboxed was not given)."""
    from .tools.python import PythonTool

    return PythonTool(unsandboxed=unsandboxed)


def _tools(spec: str | None):
    """--tools: None, "demo", or a JSON file holding a list of function tools."""
    import json

    if spec is None:
        return None, None
    if spec == "demo":
        from .demo_tools import DEMO_TOOLS, run_tool
        return DEMO_TOOLS, run_tool
    try:
        with open(spec) as f:
            tools = json.load(f)
    except (OSError, ValueError) as e:
        raise OssgptError(f"--tools {spec}: not \"demo\" nor a readable JSON file ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise OssgptError(f"--tools {spec}: expected a JSON list of function tools")
    return tools, None


def make_random(output: str, config: str = "tiny", layers: int | None = None,
                layout: str = "original", seed: int = 0) -> None:
    """Write a checkpoint of random weights in the exact official layout (MXFP4 experts), to
    test and benchmark without real weights.

    output: directory to write
    config: 20b, 120b or tiny
    layers: override the number of layers (e.g. 4 for a quick 20b-dimension model)
    layout: original or hf
    seed: random seed"""
    import dataclasses

    from .checkpoint import write_random
    from .config import ModelConfig

    if layout not in ("original", "hf"):
        raise OssgptError(f"--layout must be original or hf, got {layout!r}")
    cfg = ModelConfig.preset(config)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=None)
    path = write_random(output, cfg, fmt=layout, seed=seed)
    print(f"wrote {path} ({layout} layout, {cfg.num_hidden_layers} layers)")


def eval_nano(model: str = "nano", n: int = 200, seed: int = 0, output: str | None = None) -> None:
    """Held-out accuracy of each synthetic task family and the rate of well-formed harmony,
    greedy.

    model: checkpoint to evaluate
    n: prompts per family
    seed: data seed the model was trained with
    output: also write the figures as JSON here"""
    import json

    from . import nano

    results = nano.evaluate(_load(model, "cpu", "bfloat16"), n_per_family=n, seed=seed)
    print(f"{'family':<14}{'n':>5}{'accuracy':>10}{'well-formed':>13}")
    for family, r in results.items():
        print(f"{family:<14}{r['n']:>5}{r['accuracy']:>10.1%}{r['well_formed']:>13.1%}")
    for family, r in results.items():
        if "right_tool" in r:
            print(f"{family}: right tool with JSON-object arguments in {r['right_tool']:.1%} "
                  f"of {r['calls']} prompts that expect a call")
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)


def evaluate(suite: str = "nano", data: str | None = None, model: str = "nano",
             base_url: str | None = None, api: str = "chat", api_key: str | None = None,
             reasoning_effort: str = "medium", repeats: int = 1, limit: int | None = None,
             seed: int = 0, max_tokens: int = 4096, temperature: float = 1.0,
             top_p: float = 1.0, batch: int = 8, out: str = "eval-out", resume: bool = False,
             grader_model: str | None = None, grader_base_url: str | None = None,
             grading: str = "exact", date: str | None = None, device: str = "auto",
             dtype: str = "bfloat16", progress: bool = True) -> None:
    """Evaluate a model on a suite by reasoning effort, offline and reproducibly: writes
    OUT/samples.jsonl, summary.json and report.html and prints the table.

    suite: nano (bundled), gpqa, aime, mmlu, healthbench, humaneval or jsonl
    data: the suite's data file, in its published format (all suites but nano)
    model: nano, a checkpoint directory or hub id, run in-process; with --base-url the served model name (nano: the first the server lists)
    base_url: an OpenAI-compatible endpoint instead of the in-process model, e.g. http://127.0.0.1:8000/v1
    api: chat or responses, with --base-url
    api_key: for --base-url and --grader-base-url
    reasoning_effort: low, medium, high, or several separated by commas
    repeats: replies per sample and effort (seeded apart)
    limit: the first N samples only
    seed: the run's seed; each reply's own seed derives from it, the sample, repeat and effort
    max_tokens: most tokens per reply, and per grader verdict (AIME at high effort wants 32768)
    temperature: 0 for greedy
    top_p: nucleus sampling mass
    batch: replies decoded together (in-process) or requests in flight (--base-url)
    out: folder for the results
    resume: continue the run in OUT, skipping the samples done
    grader_model: checkpoint (or nano) that grades HealthBench rubrics in-process
    grader_base_url: an OpenAI-compatible endpoint that grades HealthBench rubrics
    grading: for --suite jsonl lines without their own: exact, regex, numeric or choice
    date: the conversation date in prompts, YYYY-MM-DD (default today; recorded in OUT/run.json)
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16
    progress: show a progress bar"""
    from . import eval as ev

    ev.run(suite=suite, data=data, model=model, reasoning_effort=reasoning_effort,
           repeats=repeats, limit=limit, seed=seed, max_tokens=max_tokens,
           temperature=temperature, top_p=top_p, batch=batch, out=out, resume=resume,
           base_url=base_url, api=api, api_key=api_key, grader_model=grader_model,
           grader_base_url=grader_base_url, grading=grading, date=date, device=device,
           dtype=dtype, progress=progress, print_table=True)


def serve(model: str = "nano", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, max_model_len: int | None = None,
          max_queue: int = 256, served_name: str | None = None, device: str = "auto",
          dtype: str = "bfloat16", adapter: str | None = None,
          batch_invariant: bool = False, steer: str | None = None, store: str | None = None,
          prefix_cache_gb: float = 1.0, prefill_chunk: int = 256, corpus: str | None = None,
          search_url: str | None = None, python: bool = True,
          python_unsandboxed: bool = False, experts_device: str | None = None) -> None:
    """Serve the model behind an OpenAI-compatible HTTP API (chat completions, responses,
    completions) with continuous batching.

    model: checkpoint directory, hub id, or "nano" (the bundled demo model)
    host: interface to listen on
    port: TCP port
    api_key: require "Authorization: Bearer KEY" on every route but /health and the chat page (which asks for the key)
    max_batch: most requests decoded together
    max_model_len: context limit per request (prompt + output tokens)
    max_queue: requests waiting beyond the batch before new ones get 503
    served_name: the model name clients send (default: the --model argument)
    device: cpu, cuda or auto (a GPU if there is one)
    dtype: bfloat16, float32 or float16
    adapter: LoRA adapters to serve beside the base, NAME=DIR[,NAME=DIR...]; requests pick one by model name
    batch_invariant: a request's tokens depend on its prompt and seed alone, not on the batch it shares (the replies of ossgpt eval's in-process runs; slower decode)
    steer: a steering vector added to the residual stream, FILE:LAYER:SCALE (made by `ossgpt inspect steer`; LAYER empty: the file's own); several comma-separated; every request is answered steered
    store: SQLite file keeping the Responses API's stored responses across restarts (default: responses.sqlite in the user's data folder, e.g. ~/.local/share/ossgpt); :memory: keeps them until the server stops
    prefix_cache_gb: memory for the keys and values of recent prompts, reused by prompts that begin alike (the next turn of a conversation, a shared system prompt); 0 turns it off
    prefill_chunk: prompt tokens prefilled between two decode steps of running requests (smaller: shorter stalls for them, slower prefill)
    corpus: the Responses API's web_search_preview tool runs gpt-oss's browser over this folder of .md, .txt, .html and .pdf files (indexed on first use)
    search_url: web_search_preview searches the web through this SearXNG-style JSON endpoint (.../search) instead of --corpus
    python: the Responses API runs code_interpreter requests' code with gpt-oss's python tool, sandboxed (--no-python: such requests get a 400)
    python_unsandboxed: run that code without its sandbox (a trusted machine and clients only)
    experts_device: where the experts live if not on --device: cpu (beside a GPU; the CPU kernels run them) or cpu:N (the first N layers' experts)"""
    import uvicorn

    from .server.app import create_app
    from .server.builtin_tools import BuiltinTools
    from .server.store import ResponseStore, default_path

    _one_process("serve")
    if store:
        try:
            responses = ResponseStore(store)               # a bad --store fails before the load
        except OssgptError as e:
            raise OssgptError(f"--store {e}") from None
    else:
        try:
            responses = ResponseStore(default_path())
        except OssgptError as e:                           # e.g. a read-only home: serve anyway
            print(f"ossgpt: the default response store {e}; kept in memory instead", file=sys.stderr)
            responses = ResponseStore(":memory:")

    adapters = {}
    for item in (adapter or "").split(","):
        if item.strip():
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise OssgptError(f"--adapter wants NAME=DIR, got {item!r}")
            adapters[name.strip()] = path.strip()
    steers = _read_steers(steer)
    builtin = BuiltinTools(_browser_backend(corpus, search_url) if corpus or search_url else None,
                           _python_tool(python_unsandboxed) if python else None)
    net = _load(model, device, dtype, experts_device=experts_device)
    app = create_app(net, served_name or model, api_key=api_key, max_batch=max_batch,
                     max_model_len=max_model_len, max_queue=max_queue, adapters=adapters,
                     batch_invariant=batch_invariant, store=responses, prefix_cache_gb=prefix_cache_gb,
                     prefill_chunk=prefill_chunk, builtin_tools=builtin)
    with _steered(net, steers):
        print(f"Serving {served_name or model} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)


def bench(model: str = "nano", prompt_tokens: int = 512, decode_steps: int = 32,
          batch: str = "1,8", device: str = "auto", dtype: str = "bfloat16",
          pack_dense: bool = True, experts: str = "auto", json_out: str | None = None,
          experts_device: str | None = None) -> None:
    """Measure a checkpoint here: load time, prefill tokens/s, time to first token, decode
    tokens/s per batch size, peak memory. Prints a table (and JSON with --json-out). Under
    torchrun the model is split over the processes (experts and attention heads); process 0 prints.

    model: checkpoint directory, hub id, or "nano"
    prompt_tokens: prompt length for prefill and time to first token
    decode_steps: decode steps timed per batch size
    batch: comma-separated decode batch sizes
    device: cpu, cuda or auto (a GPU if there is one)
    dtype: bfloat16, float32 or float16
    pack_dense: hold the dense bf16 weights in the lossless 12-bit form (CPU; --no-pack-dense: plain bf16)
    experts: mxfp4 (packed), dense (dequantized at load) or auto (dense on a GPU with room)
    json_out: also write the figures as JSON to this file
    experts_device: where the experts live if not on --device: cpu (beside a GPU; the CPU kernels run them) or cpu:N (the first N layers' experts)"""
    import json

    import torch

    from . import bench as b, parallel
    from .checkpoint import resolve
    from .checkpoint.load import resolve_device

    if dtype not in DTYPES:
        raise OssgptError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        batches = tuple(int(x) for x in batch.split(",") if x.strip())
    except ValueError:
        raise OssgptError(f"--batch wants comma-separated integers, got {batch!r}") from None
    if not batches or min(batches) < 1:
        raise OssgptError(f"--batch must be sizes >= 1, got {batch!r}")
    resolve(model)  # a bad --model is the user's error, before any timing
    place, layers = _experts_device(experts_device)
    shard = parallel.from_environment(resolve_device(device))
    r = b.run(model, prompt_tokens, decode_steps, batches, device, getattr(torch, dtype),
              pack_dense=pack_dense, experts=experts, experts_device=place, experts_layers=layers,
              shard=shard)
    if shard is not None and shard.rank:
        return
    rows = [("load", f"{r.load_s:.2f} s"),
            (f"prefill ({r.prompt_tokens} tokens)", f"{r.prefill_tok_s:.1f} tok/s"),
            ("time to first token", f"{r.ttft_s * 1000:.0f} ms")]
    rows += [(f"decode, batch {k}", f"{v:.1f} tok/s") for k, v in r.decode_tok_s.items()]
    rows += [("peak RSS", f"{r.peak_rss_gib:.2f} GiB")]
    if r.peak_gpu_gib:
        rows += [("peak GPU memory", f"{r.peak_gpu_gib:.2f} GiB")]
    if r.huge_pages_gib:
        rows += [("weights in huge pages", f"{r.huge_pages_gib:.2f} GiB")]
    if r.expert_decode_inputs.startswith("int"):
        rows += [("experts' decode inputs", f"{r.expert_decode_inputs}, a scale a block")]
    if r.expert_prefill_inputs.startswith("int"):
        rows += [("experts' prefill inputs", f"{r.expert_prefill_inputs}, a scale a block")]
    kernels = f", CPU kernels {r.cpu_kernels}" if r.cpu_kernels else ""
    print(f"{r.model} on {r.device}, {r.dtype}{' (dense weights packed)' if r.packed_dense else ''}, "
          f"{r.experts} experts, {r.threads} threads{kernels}")
    if r.placement:
        print(f"  {r.placement}")
    for name, value in rows:
        print(f"  {name:<28}{value:>16}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(r.to_dict(), f, indent=2)
