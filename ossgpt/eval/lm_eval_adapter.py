"""lm-evaluation-harness model `ossgpt`: gpt-oss models (the bundled nano, a checkpoint
directory or a hub id) scored and sampled by ossgpt, with harmony and a reasoning effort.

    ossgpt-lm-eval --model ossgpt --model_args model=nano,reasoning_effort=low --tasks ...

lm_eval's command line has no plugin hook for models from other packages (0.4.x: its registry
knows the built-in models and whatever was imported before it runs), so `ossgpt-lm-eval` (also
`python -m ossgpt.eval.lm_eval_adapter`) is lm_eval's own command line, arguments and all, with
this model registered first. From Python, importing this module registers it:
`lm_eval.simple_evaluate(model="ossgpt", model_args="model=nano", ...)`.

What each request type does:
- loglikelihood: the plain language model over context + continuation tokens (one forward, in
  batches), the summed log-probabilities of the continuation and whether greedy decoding would
  produce it. A context that the chat template rendered (`--apply_chat_template`) ends in
  `<|start|>assistant`; the continuation is then scored as the start of the final channel, as
  if the model answered without reasoning.
- loglikelihood_rolling: the text in disjoint windows of the model's context, each token
  predicted once, after `<|startoftext|>` (as lm_eval's HFLM does).
- generate_until: the context becomes a user turn rendered in harmony with the reasoning effort
  (or is used as is when the chat template already rendered it); the model reasons and answers;
  only the final channel's text comes back, cut at the first `until` string. `max_gen_toks`
  bounds the whole reply, reasoning included.

model_args: model (or pretrained) = nano | DIR | hub id; reasoning_effort = low | medium | high
(medium); dtype = bfloat16 | float32 | float16 (bfloat16); device = auto | cpu | cuda...;
max_length (the model's context); max_gen_toks (4096: when a task sets none); temperature (0:
greedy, when a task sets none); top_p (1); seed (1234: request i samples from seed + i); date
(the conversation date in the system message; "" for none, so prompts are the same every day).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (the built-in models first: see register below)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..generate import left_pad
from ..harmony import render_prompt
from ..sampling import SamplingParams
from ..tokenizer import RETURN, STARTOFTEXT, get_tokenizer
from . import _adapters

HARMONY_START = "<|start|>"
ASSISTANT_TURN = "<|start|>assistant"
FINAL_HEADER = "<|channel|>final<|message|>"
DEFAULT_BATCH = 16
log = logging.getLogger(__name__)


def _batch_size(value: object) -> int:
    """lm_eval passes an int, or "auto" / "auto:N" (batch size search: ours is fixed)."""
    text = str(value)
    if text.startswith("auto"):
        return DEFAULT_BATCH
    size = int(text)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {value!r}")
    return size


@register_model("ossgpt")
class OssgptLM(TemplateLM):
    """A gpt-oss model run by ossgpt, for lm-evaluation-harness."""

    def __init__(self, model: str = "nano", pretrained: str | None = None,
                 reasoning_effort: str = "medium", dtype: str = "bfloat16",
                 device: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 4096, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 1234, date: str = "", **kwargs) -> None:
        super().__init__()
        unknown = sorted(k for k in kwargs if k != "trust_remote_code")
        if unknown:
            raise ValueError(f"ossgpt: unknown model_args {', '.join(unknown)}")
        self.model_ref = str(pretrained if pretrained is not None else model)
        self.reasoning_effort = _adapters.effort(reasoning_effort)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's --device defaults to cuda; HFLM too falls back to the CPU.
            log.warning("ossgpt: device %s requested but no CUDA GPU is available: using the CPU",
                        device)
            device = "cpu"
        self.model = _adapters.load_model(self.model_ref, _adapters.dtype(dtype), device or "auto")
        self.tok = get_tokenizer()
        self.batch_size = _batch_size(batch_size)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self._max_length = int(max_length) if max_length else self.model.config.context_length
        self.max_gen_toks = int(max_gen_toks)
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.date = "" if date is None else str(date)
        self._device = self.model.device
        self._engine = None

    # -- what lm_eval asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return RETURN

    @property
    def prefix_token_id(self) -> int:
        return STARTOFTEXT

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        # Fingerprints lm_eval's request cache: the chat rendering depends on the effort and date.
        return f"ossgpt-harmony-o200k-{self.reasoning_effort}-{self.date or 'nodate'}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return f"harmony (openai-harmony, reasoning effort {self.reasoning_effort})"

    def get_model_info(self) -> dict:
        return {"model_name": self.model_ref, "reasoning_effort": self.reasoning_effort,
                "dtype": str(self.model.dtype).removeprefix("torch."), "engine": "ossgpt"}

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat rendered in harmony with the reasoning effort, as text with its special
        tokens: ends in `<|start|>assistant` for the model's reply, or, when the last message
        is an assistant prefix to continue (lm_eval's gen_prefix), inside the final channel
        right after that prefix."""
        messages = [dict(m) for m in chat_history]
        prefix = None
        if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
            prefix = messages.pop().get("content") or ""
        text = self.tok.decode(render_prompt(messages, reasoning_effort=self.reasoning_effort,
                                             date=self.date))
        return text if prefix is None else text + FINAL_HEADER + prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        # Harmony markup is read as special tokens only in what the chat template rendered.
        return self.tok.encode(string, allow_special=string.startswith(HARMONY_START))

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context.startswith(HARMONY_START) and context.endswith(ASSISTANT_TURN):
            # A rendered chat: the continuation is the start of the final answer, its own tokens
            # after the header's <|message|> (text after a special token is tokenized apart).
            return self.tok_encode(context + FINAL_HEADER), self.tok.encode(continuation)
        return super()._encode_pair(context, continuation)

    # -- loglikelihood ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Longest first (the least padding within a batch), batch_size sequences a forward."""
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="ossgpt loglikelihood", disable=disable_tqdm or None)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scores = self.score_tokens([(requests[i][1], requests[i][2]) for i in batch])
            for i, answer in zip(batch, scores):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], chunk_size: int = 512
                     ) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) pairs -> (sum of the continuation's
        log-probabilities, whether each of its tokens is the argmax), together in one left-padded
        batch run through the model in chunks over its cache. Context beyond max_length is cut
        from the left, as in HFLM."""
        rows, conts = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("loglikelihood of an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append(whole[:-1])
            conts.append(whole[len(whole) - min(len(continuation), len(whole) - 1):])
        tokens, positions = left_pad(rows, self.model.device)
        cache = self.model.make_cache()
        states = [self.model.hidden_states(tokens[:, s:s + chunk_size], cache,
                                           positions[:, s:s + chunk_size])
                  for s in range(0, tokens.shape[1], chunk_size)]
        h = torch.cat(states, dim=1)
        L = tokens.shape[1]
        out = []
        for i, cont in enumerate(conts):
            logprobs = torch.log_softmax(self.model.logits(h[i, L - len(cont):]), dim=-1)
            target = torch.tensor(cont, device=logprobs.device)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            out.append((total, bool((logprobs.argmax(dim=-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------

    def prompt_tokens(self, context: str) -> list[int]:
        """A rendered chat as is; any other context as the user's turn."""
        if context.startswith(HARMONY_START):
            return self.tok.encode(context, allow_special=True)
        return render_prompt([{"role": "user", "content": context}],
                             reasoning_effort=self.reasoning_effort, date=self.date)

    def _sampling(self, gen_kwargs: dict, index: int) -> tuple[SamplingParams, list[str], int]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", None) or self.max_gen_toks)
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", self.temperature))
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        sampling = SamplingParams(temperature=temperature,
                                  top_p=float(kwargs.pop("top_p", None) or self.top_p),
                                  top_k=int(kwargs.pop("top_k", None) or 0),
                                  seed=self.seed + index)
        return sampling, until, max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._engine is None:
            self._engine = _adapters.make_engine(self.model, self.batch_size)
        jobs, skipped = [], set()
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            sampling, until, max_gen = self._sampling(gen_kwargs or {}, i)
            prompt = self.prompt_tokens(context)
            room = self.max_length - len(prompt)
            if room < 1:   # a harmony prompt cut at the left is no longer harmony
                log.warning(
                    "ossgpt: a %d-token prompt fills the %d-token context: empty answer",
                    len(prompt), self.max_length)
                skipped.add(i)
                continue
            jobs.append((prompt, min(max_gen, room), sampling, until))
        bar = tqdm(total=len(jobs), desc="ossgpt generate_until", disable=disable_tqdm or None)
        runs = iter(_adapters.run_all(self._engine, jobs, progress=lambda: bar.update(1)))
        bar.close()
        answers = []
        for i, req in enumerate(requests):
            text = "" if i in skipped else next(runs).content
            self.cache_hook.add_partial("generate_until", req.args, text)
            answers.append(text)
        return answers


def main(argv: list[str] | None = None) -> None:
    """`ossgpt-lm-eval`: lm_eval's command line with the `ossgpt` model registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
