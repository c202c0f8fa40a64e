"""A replica's service: a checked request in, text pieces and the request's usage out.

It loads the pair and the run's router once, builds the engine (`serve.max_batch` slots of
`serve.max_model_len` tokens) and its `EngineLoop`, and per request: builds the prompt's token ids
(the chat template, or for a pair without one the task's prompt template around the last user
message), picks the policy (router at a threshold, or one model alone) and sampling, then turns
the engine's final tokens into text, cutting it at a stop string.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Collection
from dataclasses import asdict, dataclass

import torch

from pipeline import CiterError
from pipeline.config import Config
from pipeline.decoding import GREEDY, Engine, LLMOnly, Policy, Request, RouterPolicy, Sampling, SLMOnly, settings
from pipeline.models import check_model_name, encode_prompts, load_pair
from pipeline.router import CONFIG, load_router
from pipeline.rundir import router_dir
from pipeline.serving.protocol import GenerateRequest, Usage, invalid, queue_full
from pipeline.serving.scheduler import EngineLoop, QueueFull
from pipeline.storage import StoragePath, run_path
from pipeline.tasks import DEFAULT_PROMPTS

log = logging.getLogger(__name__)


def served_router(run: str | StoragePath, iteration: int | None = None) -> StoragePath:
    """The router a run trained at `iteration`, or at its last iteration that exported one."""
    run = run_path(run)
    if iteration is not None:
        found = router_dir(run, iteration)
        if not (found / CONFIG).is_file():
            raise CiterError(f"{found}: no router there (iteration {iteration} of {run} has not finished training)")
        return found
    routers = sorted(d.parent for d in run.glob("iter-*/router") if (d / CONFIG).is_file())
    if not routers:
        raise CiterError(f"{run}: no trained router (no iter-*/router/{CONFIG}); train one with `citer train`")
    return routers[-1] / "router"


def served_name(cfg: Config) -> str:
    """The model id clients send: `serve.model_name`, or the config's name."""
    return cfg.serve.model_name or cfg.name


def check_room(max_model_len: int, configs: dict[str, object]) -> None:
    """Refuse rows longer than a model's positions reach (`max_position_embeddings`); `configs`
    maps SLM and LLM to their model configs."""
    for role, config in configs.items():
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_model_len > limit:
            raise CiterError(f"serve.max_model_len is {max_model_len} but the {role} takes at most {limit} positions: "
                             f"set serve.max_model_len <= {limit}")


def check_servable(cfg: Config, router_path: str | StoragePath) -> None:
    """What a replica would refuse, checked before anything starts: the models' names and positions,
    and a router that reads the SLM's hidden states."""
    from transformers import AutoConfig

    configs = {}
    for role, name in (("SLM", cfg.models.slm), ("LLM", cfg.models.llm)):
        check_model_name(name)
        try:
            configs[role] = AutoConfig.from_pretrained(name, trust_remote_code=cfg.models.trust_remote_code)
        except (OSError, ValueError) as e:
            raise CiterError(f"could not read the config of model {name!r}: {e}") from None
    check_room(cfg.serve.max_model_len, configs)
    load_router(router_path, expected_input_size=configs["SLM"].hidden_size)


@dataclass
class Piece:
    """Text that became final; the last piece of a request has its finish reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class TextStream:
    """Token ids in, text out: decodes the ids seen so far (end ids left out), holds back an
    unfinished UTF-8 character and any tail that may begin a stop string, and ends at a stop string."""

    def __init__(self, tokenizer, eos_ids: Collection[int], stops: tuple[str, ...]):
        self.tokenizer, self.eos_ids, self.stops = tokenizer, frozenset(eos_ids), stops
        self.ids: list[int] = []
        self.decoded = 0  # characters of the decoded text already taken in
        self.held = ""
        self.stopped = False

    def push(self, tokens: list[int]) -> str:
        """The text `tokens` add that is final; after a stop string, `stopped` is set."""
        self.ids += [t for t in tokens if t not in self.eos_ids]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        buf, self.decoded = self.held + text[self.decoded:], len(text)
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Service:
    """The pair, the router and the engine loop of one replica."""

    def __init__(self, cfg: Config, router_path: str | StoragePath, threshold: float | None = None):
        s = cfg.serve
        self.cfg, self.name = cfg, served_name(cfg)
        self.threshold = s.threshold if threshold is None else threshold
        self.pair = load_pair(cfg.models)
        check_room(s.max_model_len, {"SLM": self.pair.slm.config, "LLM": self.pair.llm.config})
        self.router = load_router(router_path, expected_input_size=self.pair.hidden_size,
                                  device=self.pair.device).router
        self.router_path = str(router_path)
        engine = Engine(self.pair.slm, self.pair.llm, **self.pair.decode_kwargs, n_slots=s.max_batch,
                        capacity=s.max_model_len, router=self.router, **settings(cfg.decode))
        self.loop = EngineLoop(engine, s.max_queue)
        self.template = cfg.task.prompt_template or DEFAULT_PROMPTS[cfg.task.format]
        self._index = itertools.count()
        log.info("serving %s: SLM %s, LLM %s, router %s at threshold %g; %d slots of %d tokens, %d more may wait",
                 self.name, cfg.models.slm, cfg.models.llm, router_path, self.threshold, s.max_batch,
                 s.max_model_len, s.max_queue)

    # ------------------------------------------------------------------------------------------
    # A request into the engine

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids, checked against the vocabulary and the row's room."""
        tok, chat_template = self.pair.tokenizer, self.cfg.models.chat_template
        param = "messages" if request.chat else "prompt"
        if not request.chat and not isinstance(request.prompt, str):
            ids = list(request.prompt)
            if max(ids) >= self.pair.n_ids:
                raise invalid("prompt", f"token id {max(ids)} is not in the vocabulary ({self.pair.n_ids} ids)")
        elif request.chat and chat_template:
            ids = list(tok.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
        else:
            text = request.prompt if not request.chat else self._templated(request)
            ids = encode_prompts(tok, [text], chat_template=False)[0]
        room = self.cfg.serve.max_model_len
        if not ids:
            raise invalid(param, "the prompt is empty (0 tokens)")
        if len(ids) >= room:
            raise invalid(param, f"the prompt is {len(ids)} tokens; this server holds {room} tokens a request "
                                 "(prompt and completion)")
        return ids

    def _templated(self, request: GenerateRequest) -> str:
        """A pair without a chat template answers the task's prompt around the last user message."""
        users = [m["content"] for m in request.messages if m["role"] == "user"]
        if not users:
            raise invalid("messages", "no user message (this model's prompt is built from the last user message)")
        return self.template.format_map(defaultdict(str, question=users[-1]))

    def policy(self, request: GenerateRequest) -> Policy:
        mode = request.routing.mode
        if mode == "llm":
            return LLMOnly()
        if mode == "slm":
            return SLMOnly()
        threshold = self.threshold if request.routing.threshold is None else request.routing.threshold
        return RouterPolicy(self.router, threshold)

    def engine_request(self, request: GenerateRequest) -> Request:
        prompt = self.prompt_ids(request)
        room = self.cfg.serve.max_model_len - len(prompt)
        if request.max_tokens is None:
            max_new = min(self.cfg.serve.max_tokens, room)
        elif request.max_tokens > room:
            param = "max_completion_tokens" if request.chat else "max_tokens"
            raise invalid(param, f"{request.max_tokens} tokens do not fit after the {len(prompt)}-token prompt: "
                                 f"this server holds {self.cfg.serve.max_model_len} tokens a request")
        else:
            max_new = request.max_tokens
        sampling = GREEDY
        if request.temperature > 0:
            seed = secrets.randbelow(2**31) if request.seed is None else request.seed
            sampling = Sampling(request.temperature, request.top_p, seed)
        return Request(prompt, self.policy(request), max_new, index=next(self._index), sampling=sampling)

    # ------------------------------------------------------------------------------------------
    # Decoding

    def submit(self, request: GenerateRequest):
        """Check `request` and queue it (raising `APIError` 400 or 429); returns its job."""
        engine_request = self.engine_request(request)
        try:
            return self.loop.submit(engine_request)
        except QueueFull as e:
            raise queue_full(e.args[0]) from None

    async def generate(self, request: GenerateRequest, job=None) -> AsyncIterator[Piece]:
        """The request's text as it becomes final; the last piece carries the finish reason and
        usage. Closing the iterator early (the client went away) frees the request's slot."""
        job = job or self.submit(request)
        text = TextStream(self.pair.tokenizer, self.pair.eos_ids, request.stop)
        n, finish = 0, "length"
        try:
            async for tokens in self.loop.tokens(job):
                n += len(tokens)
                piece = text.push(tokens)
                if text.stopped or tokens[-1] in self.pair.eos_ids:
                    finish = "stop"
                if text.stopped:
                    self.loop.cancel(job)
                    yield Piece(piece)
                    break
                if piece:
                    yield Piece(piece)
            yield Piece(text.flush(), finish, self._usage(job, n, request))
        finally:
            self.loop.cancel(job)

    def _usage(self, job, completion_tokens: int, request: GenerateRequest) -> Usage:
        gen = job.generation
        routing = request.routing
        if routing.mode == "router" and routing.threshold is None:
            routing = type(routing)("router", self.threshold)
        return Usage(prompt_tokens=len(job.request.prompt), completion_tokens=completion_tokens,
                     llm_tokens=sum(gen.from_llm[:completion_tokens]), llm_passes=gen.llm_passes,
                     slm_passes=gen.slm_passes, rollbacks=gen.rollbacks, routing=routing)

    def status(self) -> dict:
        return {"model": self.name, "router": self.router_path, "threshold": self.threshold,
                "device": str(self.pair.device), "torch_threads": torch.get_num_threads(),
                **asdict(self.loop.stats)}

    def close(self) -> None:
        self.loop.close()

