"""OpenAI's chat and completions shapes: a request body checked into a `GenerateRequest` (or an
`APIError` naming the field at fault), and the response objects and stream chunks built back.

Only what citer can honour is accepted: one choice (`n` = 1), no log probabilities, tools or
penalties. citer's own per-request routing travels in the `citer` field (the openai client's
`extra_body`): `{"threshold": 0.8}` routes with the router at 0.8; `{"routing": "llm"}` or
`{"routing": "slm"}` decodes with one model alone.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import CiterError

ROUTINGS = ("router", "llm", "slm")
MAX_STOPS = 4  # as OpenAI
ROLES = ("system", "developer", "user", "assistant", "tool")

COMMON = {"model", "max_tokens", "stop", "temperature", "top_p", "seed", "n", "stream", "stream_options", "citer",
          "user", "metadata", "store", "service_tier", "presence_penalty", "frequency_penalty", "logit_bias",
          "logprobs"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                 "response_format", "reasoning_effort", "modalities", "prediction", "audio"}
TEXT = COMMON | {"prompt", "echo", "suffix", "best_of"}
# Accepted only at the value that asks for nothing (as the openai client may send them explicitly).
UNSUPPORTED_UNLESS = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
                      "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
                      "best_of": (1,), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False, True),
                      "response_format": ({"type": "text"},), "modalities": (["text"],)}


class APIError(Exception):
    """A refused request: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def unknown_model(name: Any, served: str) -> APIError:
    return APIError(404, f"model {name!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


def queue_full(waiting: int) -> APIError:
    return APIError(429, f"the server is at capacity ({waiting} requests are already waiting for a slot); "
                    "retry later", type="requests", code="rate_limit_exceeded")


def api_error(e: Exception) -> APIError:
    """A refused request's `APIError`; a `CiterError` raised while checking it is a 400."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, CiterError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}", type="server_error")


@dataclass(frozen=True)
class Routing:
    """How one request is decoded: `router` at `threshold`, or one model alone (`llm`, `slm`)."""

    mode: str = "router"
    threshold: float | None = None  # None: the server's default

    def usage(self) -> dict[str, Any]:
        return {"routing": self.mode, **({"threshold": self.threshold} if self.mode == "router" else {})}


@dataclass(frozen=True)
class GenerateRequest:
    """A checked chat or completions request. `messages` for chat, `prompt` (text or token ids)
    for completions; `max_tokens` None: the server's default."""

    chat: bool
    model: str
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | tuple[int, ...] = ""
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    routing: Routing = field(default_factory=Routing)


def parse_request(body: Any, *, chat: bool, served_model: str, max_stops: int = MAX_STOPS) -> GenerateRequest:
    """Check a request body (already JSON-decoded) and return what it asks for; raise `APIError`
    (400 naming the field, or 404 for another model) for anything malformed or unsupported."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = CHAT if chat else TEXT
    for key in body:
        if key not in allowed:
            raise invalid(key, f"unknown parameter for {'chat/completions' if chat else 'completions'}")
    for key, accepted in UNSUPPORTED_UNLESS.items():
        if key in body and body[key] is not None and not any(_same(body[key], a) for a in accepted):
            raise invalid(key, "not supported by citer")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required, a string")
    if model != served_model:
        raise unknown_model(model, served_model)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("n", f"only n = 1 is supported, got {n!r}")
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", "expected {\"include_usage\": true|false}")
        include_usage = _optional(options, "include_usage", bool, False, "stream_options.include_usage")
    if chat:
        max_tokens = _max_tokens(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _max_tokens(body, "max_tokens")
        extra = {"messages": _messages(body.get("messages"))}
    else:
        max_tokens = _max_tokens(body, "max_tokens")
        extra = {"prompt": _prompt(body.get("prompt"))}
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("top_p", "must be > 0")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise invalid("seed", f"expected an integer, got {seed!r}")
    return GenerateRequest(chat=chat, model=model, max_tokens=max_tokens, stop=_stop(body.get("stop"), max_stops),
                           temperature=temperature, top_p=top_p, seed=seed, stream=stream,
                           include_usage=include_usage, routing=_routing(body.get("citer")), **extra)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or _is_int(a) and isinstance(b, float) and a == b


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict, key: str, tp: type, default: Any, name: str | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, tp):
        raise invalid(name or key, f"expected {tp.__name__}, got {value!r}")
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(key, f"expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise invalid(key, f"must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _max_tokens(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise invalid(key, f"expected an integer >= 1, got {value!r}")
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "required, a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, "expected an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(where, "expected a string or a list of text parts")


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(t) and t >= 0 for t in value):
        return tuple(value)
    raise invalid("prompt", "expected a string or a list of token ids (one prompt: n = 1)")


def _stop(value: Any, max_stops: int) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected a non-empty string or a list of them")
    if len(stops) > max_stops:
        raise invalid("stop", f"at most {max_stops} stop strings, got {len(stops)}")
    return tuple(stops)


def _routing(value: Any) -> Routing:
    if value is None:
        return Routing()
    if not isinstance(value, dict):
        raise invalid("citer", 'expected an object such as {"threshold": 0.8} or {"routing": "llm"}')
    for key in value:
        if key not in ("routing", "threshold"):
            raise invalid(f"citer.{key}", "unknown key; citer takes routing and threshold")
    mode = value.get("routing", "router")
    if mode not in ROUTINGS:
        raise invalid("citer.routing", f"expected one of {', '.join(ROUTINGS)}, got {mode!r}")
    threshold = value.get("threshold")
    if threshold is not None:
        if mode != "router":
            raise invalid("citer.threshold", f"only with routing 'router', not {mode!r}")
        if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
            raise invalid("citer.threshold", f"expected a number in [0, 1], got {threshold!r}")
        threshold = float(threshold)
    return Routing(mode, threshold)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass
class Usage:
    """Token counts of one request, with citer's own: the tokens the LLM wrote, their share, and
    the LLM and SLM passes the request took part in."""

    prompt_tokens: int
    completion_tokens: int
    llm_tokens: int
    llm_passes: int
    slm_passes: int
    rollbacks: int
    routing: Routing

    def body(self) -> dict[str, Any]:
        ratio = self.llm_tokens / self.completion_tokens if self.completion_tokens else 0.0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "citer": {**self.routing.usage(), "llm_tokens": self.llm_tokens, "llm_call_ratio": ratio,
                          "llm_passes": self.llm_passes, "slm_passes": self.slm_passes, "rollbacks": self.rollbacks}}


class Reply:
    """The response objects of one request: the whole completion, or its stream chunks."""

    def __init__(self, request: GenerateRequest):
        self.chat = request.chat
        self.model = request.model
        self.include_usage = request.include_usage
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        choice = ({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._head(False), "choices": [{"index": 0, **choice, "finish_reason": finish_reason,
                                                  "logprobs": None}], "usage": usage.body()}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(True), "choices": [choice], **({"usage": None} if self.include_usage else {})}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage.body()}


SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def models_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "citer"}]}
