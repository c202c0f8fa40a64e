"""`citer serve` over real HTTP on 127.0.0.1: a real Ray Serve on a local Ray, the official openai
client, the demo pair and the SmolLM2 pair. Every expected text is computed here, independently of
the server, by the cache-free reference decoder on the prompt's own token ids."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pipeline.config import load_config
from pipeline.decoding import GREEDY, LLMOnly, RouterPolicy, Sampling, SLMOnly, decode, reference_decode
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec, load_router, save_router
from pipeline.rundir import router_dir
from pipeline.worlds.demo import make_problem
from tests.conftest import DEMO_CONFIG, ROOT, free_port

# Ray Serve 2.60's own pydantic fields warn on import; nothing citer can change.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")
SMOL_CONFIG = ROOT / "jobs" / "configs" / "smol-gsm8k.yaml"
THRESHOLD = 0.5  # the untrained routers' probabilities spread around it: both models write tokens


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Expected outputs are computed in this process, beside the server's replicas: one torch thread
    (two threads on two busy cores spend most of their time waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def untrained_run(directory: Path, input_size: int) -> Path:
    """A run directory holding one untrained router (serving is about the engine, not its quality)."""
    torch.manual_seed(1)
    save_router(Router(RouterSpec(input_size=input_size)).eval(), router_dir(directory, 0))
    return directory


class Served:
    """One served application: its base URL, config, pair and router (loaded here for the expected
    outputs), and clients."""

    def __init__(self, base: str, cfg, run: Path, pair=None, reference: bool = True):
        self.base, self.cfg, self.reference = base, cfg, reference
        self.pair = pair or load_pair(cfg.models)
        self.router = load_router(router_dir(run, 0), expected_input_size=self.pair.hidden_size).router
        self.name = cfg.serve.model_name or cfg.name
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=30).json()

    def expected(self, prompt: list[int], routing: str = "router", max_tokens: int = 64, threshold: float = THRESHOLD,
                 sampling: Sampling = GREEDY):
        """What decoding `prompt` alone gives: the cache-free reference, or (`reference` off: the larger
        SmolLM2 pair) the engine with the request alone in it (test_decoding shows that the two agree)."""
        policy = {"router": lambda: RouterPolicy(self.router, threshold), "llm": LLMOnly, "slm": SLMOnly}[routing]()
        kw = dict(eos_ids=self.pair.eos_ids, max_new_tokens=max_tokens, n_ids=self.pair.n_ids)
        if not self.reference and sampling.greedy:
            g = decode(self.pair.slm, self.pair.llm, [prompt], policy, pad_id=self.pair.tokenizer.pad_token_id,
                       batch_size=1, **kw).generations[0]
        else:
            g = reference_decode(self.pair.slm, self.pair.llm, [prompt], policy, sampling=sampling, **kw)[0]
        text = self.pair.tokenizer.decode([t for t in g.tokens if t not in self.pair.eos_ids], skip_special_tokens=True)
        return g, text

    def demo_prompt(self, question: str) -> list[int]:
        """The demo pair has no chat template: the task's template, `{question}\\n`, around the message."""
        return self.pair.tokenizer(question + "\n", add_special_tokens=False)["input_ids"]


def hidden_size(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def servers(local_ray, demo_world, smol_world, tmp_path_factory):
    """Three applications on one Serve: the demo pair (8 slots), the SmolLM2 pair (8 slots), and the
    SmolLM2 pair again with one slot and one place in its queue; Serve is shut down afterwards."""
    from ray import serve

    from pipeline.serving.app import application

    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    common = [f"serve.threshold={THRESHOLD}", "serve.num_cpus_per_replica=0.5", "serve.max_model_len=256"]
    demo_models = [f"models.slm={demo_world / 'slm'}", f"models.llm={demo_world / 'llm'}"]
    smol_models = [f"models.slm={smol_world / 'slm'}", f"models.llm={smol_world / 'llm'}"]
    configs = {
        "demo": load_config(DEMO_CONFIG, [*common, *demo_models, "serve.max_batch=8", "serve.max_queue=64"]),
        "smol": load_config(SMOL_CONFIG, [*common, *smol_models, "serve.max_batch=8", "serve.max_queue=64"]),
        "narrow": load_config(SMOL_CONFIG, [*common, *smol_models, "serve.max_batch=1", "serve.max_queue=1",
                                            "serve.max_model_len=512"]),
    }
    runs = {"demo": untrained_run(tmp / "demo-run", hidden_size(demo_world / "slm")),
            "smol": untrained_run(tmp / "smol-run", hidden_size(smol_world / "slm"))}
    runs["narrow"] = runs["smol"]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run_many([serve.RunTarget(application(cfg, router_dir(runs[name], 0)), name=name,
                                        route_prefix=f"/{name}") for name, cfg in configs.items()])
        base = f"http://127.0.0.1:{port}"
        served = {"demo": Served(f"{base}/demo", configs["demo"], runs["demo"]),
                  "smol": Served(f"{base}/smol", configs["smol"], runs["smol"], reference=False)}
        served["narrow"] = Served(f"{base}/narrow", configs["narrow"], runs["narrow"], served["smol"].pair,
                                  reference=False)
        yield served
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def demo(servers) -> Served:
    return servers["demo"]


@pytest.fixture(scope="module")
def smol(servers) -> Served:
    return servers["smol"]


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_problem(rng, 3)["question"] for _ in range(n)]


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_models_and_health(demo):
    assert [m.id for m in demo.client.models.list().data] == ["demo"]
    health = demo.health()
    assert health["status"] == "ok" and health["slots"] == 8 and health["model"] == "demo"


def test_a_chat_completion_is_the_solo_greedy_decode_with_citers_usage(demo):
    question = "What is 123+456?"
    reply = demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                temperature=0)
    g, text = demo.expected(demo.demo_prompt(question), max_tokens=demo.cfg.serve.max_tokens)
    assert reply.object == "chat.completion" and reply.model == "demo" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "stop"  # the model wrote its end token
    usage = reply.usage
    assert usage.prompt_tokens == len(demo.demo_prompt(question)) and usage.completion_tokens == len(g.tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    citer = usage.citer
    assert citer["routing"] == "router" and citer["threshold"] == THRESHOLD
    assert citer["llm_tokens"] == sum(g.from_llm) and 0 < citer["llm_tokens"] < len(g.tokens)
    assert citer["llm_call_ratio"] == pytest.approx(sum(g.from_llm) / len(g.tokens))
    assert citer["llm_passes"] >= 1 and citer["slm_passes"] >= len(g.tokens)


def test_completions_take_text_or_token_ids_and_stop_at_max_tokens(demo):
    prompt = demo.demo_prompt("What is 321+654?")
    _, text = demo.expected(prompt, max_tokens=5)
    for given in (demo.pair.tokenizer.decode(prompt), prompt):
        reply = demo.client.completions.create(model="demo", prompt=given, max_tokens=5, temperature=0)
        assert reply.object == "text_completion" and reply.choices[0].text == text
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_routing_per_request_in_the_citer_field(demo):
    question = "What is 505+606?"
    prompt = demo.demo_prompt(question)
    for routing, extra in (("llm", {"routing": "llm"}), ("slm", {"routing": "slm"}), ("router", {"threshold": 0.9})):
        threshold = extra.get("threshold", THRESHOLD)
        reply = demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                    temperature=0, extra_body={"citer": extra})
        g, text = demo.expected(prompt, routing, demo.cfg.serve.max_tokens, threshold)
        citer = reply.usage.citer
        assert reply.choices[0].message.content == text and citer["routing"] == routing
        assert citer["llm_tokens"] == sum(g.from_llm)
    assert citer["threshold"] == 0.9
    llm = demo.client.completions.create(model="demo", prompt=question, max_tokens=8, temperature=0,
                                         extra_body={"citer": {"routing": "llm"}}).usage.citer
    slm = demo.client.completions.create(model="demo", prompt=question, max_tokens=8, temperature=0,
                                         extra_body={"citer": {"routing": "slm"}}).usage.citer
    assert llm["llm_call_ratio"] == 1.0 and slm["llm_call_ratio"] == 0.0
    assert slm["llm_passes"] == 0 and llm["slm_passes"] == 0


def test_sampling_is_reproducible_for_a_seed(demo):
    question = "What is 777+888?"
    sampling = Sampling(temperature=1.5, top_p=0.9, seed=11)
    _, text = demo.expected(demo.demo_prompt(question), max_tokens=32, sampling=sampling)

    def ask(seed: int) -> str:
        return demo.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], temperature=1.5, top_p=0.9, seed=seed,
            max_tokens=32).choices[0].message.content

    assert ask(11) == text == ask(11)
    greedy = demo.expected(demo.demo_prompt(question), max_tokens=32)[1]
    assert {ask(seed) for seed in range(4)} != {greedy}  # sampling really samples


def test_stop_strings_cut_the_text_and_end_the_request(demo):
    question = "What is 246+135?"
    _, text = demo.expected(demo.demo_prompt(question), max_tokens=demo.cfg.serve.max_tokens)
    stop = text[text.index("=", 6): text.index("=", 6) + 2]  # the second '=' and what follows it
    cut = text[: text.index(stop)]
    before = demo.health()["cancelled"]
    reply = demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                temperature=0, stop=[stop, "never"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    streamed = demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                   temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert demo.health()["cancelled"] == before + 2  # both requests left their slots at the stop


# ---------------------------------------------------------------------------------------------
# Streaming


def test_a_chat_stream_has_openais_chunks_usage_and_done(demo):
    question = "What is 468+135?"
    g, text = demo.expected(demo.demo_prompt(question), max_tokens=demo.cfg.serve.max_tokens)
    stream = demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(g.tokens)
    assert chunks[-1].usage.citer["llm_tokens"] == sum(g.from_llm)
    assert all(c.usage is None for c in chunks[:-1])


def test_a_completions_stream_ends_with_done_on_the_wire(demo):
    prompt = demo.demo_prompt("What is 864+531?")
    _, text = demo.expected(prompt, max_tokens=20)
    body = {"model": "demo", "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{demo.base}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


# ---------------------------------------------------------------------------------------------
# Continuous batching


def test_16_concurrent_greedy_requests_equal_their_solo_decodes(demo):
    """Mixed routings and lengths in one batch of 8 slots: rows join and leave between steps."""
    asks = [(q, ("router", "llm", "slm", "router")[i % 4], (None, 12, None, 40)[i % 4])
            for i, q in enumerate(questions(16, seed=5))]
    steps = demo.health()["steps"]

    def ask(q: str, routing: str, max_tokens: int | None):
        extra = {"citer": {"routing": routing}}
        return demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=max_tokens, extra_body=extra)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda a: ask(*a), asks))
    total = 0
    for (q, routing, max_tokens), reply in zip(asks, replies, strict=True):
        g, text = demo.expected(demo.demo_prompt(q), routing, max_tokens or demo.cfg.serve.max_tokens)
        assert reply.choices[0].message.content == text, (q, routing)
        assert reply.usage.completion_tokens == len(g.tokens) and reply.usage.citer["llm_tokens"] == sum(g.from_llm)
        total += len(g.tokens)
    assert demo.health()["steps"] - steps < total / 3  # steps decoded many rows at once


def test_a_full_queue_is_refused_with_429_and_a_disconnected_client_frees_its_slot(servers):
    """One slot, one place in the queue: a long stream holds the slot, a second request waits, a third
    is refused; the stream's client goes away, and the waiting request gets the slot and completes."""
    narrow = servers["narrow"]
    long = {"model": "smol-gsm8k", "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Count from 1 to 500, one number a line."}],
            "citer": {"routing": "llm"}}
    short = [{"role": "user", "content": "Name a colour."}]
    start = narrow.health()
    with httpx.stream("POST", f"{narrow.base}/v1/chat/completions", json=long, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert next(line for line in lines if '"content":"' in line and '"content":""' not in line)  # it decodes
        waiting: dict = {}
        worker = threading.Thread(target=lambda: waiting.update(reply=narrow.client.chat.completions.create(
            model="smol-gsm8k", messages=short, max_tokens=4, temperature=0)))
        worker.start()
        deadline = time.time() + 30
        while narrow.health()["waiting"] < 1:
            assert time.time() < deadline, "the second request never queued"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            narrow.client.chat.completions.create(model="smol-gsm8k", messages=short, max_tokens=4)
        assert refused.value.status_code == 429
        assert set(refused.value.body) == {"message", "type", "param", "code"}
        assert narrow.health()["running"] == 1 and not waiting
    worker.join(timeout=60)  # the stream's client is gone: its slot goes to the waiting request
    assert waiting["reply"].choices[0].message.content == narrow.expected(smol_prompt(narrow, short), max_tokens=4)[1]
    end = narrow.health()
    assert end["cancelled"] == start["cancelled"] + 1 and end["refused"] == start["refused"] + 1
    assert end["finished"] == start["finished"] + 1  # the long request did not finish: it was dropped
    assert end["running"] == end["waiting"] == 0 and end["admitted"] == start["admitted"] + 2


# ---------------------------------------------------------------------------------------------
# Refusals


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "What is 1+2?"}]}
TEXT = {"model": "demo", "prompt": "What is 1+2?\n"}
REFUSED = [  # (endpoint, body, status, the field named)
    ("chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("chat/completions", {"messages": CHAT["messages"]}, 400, "model"),
    ("chat/completions", {**CHAT, "n": 2}, 400, "n"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": "ten"}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 10_000}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "temperature": 2.5}, 400, "temperature"),
    ("chat/completions", {**CHAT, "temperature": True}, 400, "temperature"),
    ("chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {**CHAT, "seed": 1.5}, 400, "seed"),
    ("chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat/completions", {**CHAT, "stop": [""]}, 400, "stop"),
    ("chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat/completions", {"model": "demo"}, 400, "messages"),
    ("chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "system", "content": "Be brief."}]}, 400,
     "messages"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "9" * 300}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("chat/completions", {**CHAT, "colour": "blue"}, 400, "colour"),
    ("chat/completions", {**CHAT, "citer": {"routing": "gpt"}}, 400, "citer.routing"),
    ("chat/completions", {**CHAT, "citer": {"threshold": 1.5}}, 400, "citer.threshold"),
    ("chat/completions", {**CHAT, "citer": {"routing": "llm", "threshold": 0.5}}, 400, "citer.threshold"),
    ("chat/completions", {**CHAT, "citer": {"budget": 3}}, 400, "citer.budget"),
    ("completions", {"model": "demo"}, 400, "prompt"),
    ("completions", {**TEXT, "prompt": ["one", "two"]}, 400, "prompt"),
    ("completions", {**TEXT, "prompt": [3, 99_999]}, 400, "prompt"),
    ("completions", {**TEXT, "prompt": ""}, 400, "prompt"),
    ("completions", {**TEXT, "echo": True}, 400, "echo"),
    ("completions", {**TEXT, "messages": CHAT["messages"]}, 400, "messages"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), REFUSED,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, _, p) in enumerate(REFUSED)])
def test_malformed_requests_are_refused_naming_the_field(demo, endpoint, body, status, param):
    response = httpx.post(f"{demo.base}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"].startswith(param) or status == 404
    assert "\n" not in error["message"]


def test_a_body_that_is_not_json_is_a_400_and_the_openai_client_sees_its_errors(demo):
    response = httpx.post(f"{demo.base}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        demo.client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError) as refused:
        demo.client.chat.completions.create(model="demo", messages=CHAT["messages"], n=3)
    assert refused.value.body["param"] == "n"


# ---------------------------------------------------------------------------------------------
# The SmolLM2 pair: a real chat template and a real tokenizer


def smol_prompt(smol: Served, messages: list[dict]) -> list[int]:
    return list(smol.pair.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))


def test_smol_chat_uses_the_chat_template_and_streams_the_same_text(smol):
    messages = [{"role": "system", "content": "You are a careful tutor."},
                {"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}]
    g, text = smol.expected(smol_prompt(smol, messages), max_tokens=24)
    reply = smol.client.chat.completions.create(model="smol-gsm8k", messages=messages, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == text and text.strip()
    assert reply.usage.prompt_tokens == len(smol_prompt(smol, messages))
    assert reply.usage.citer["llm_tokens"] == sum(g.from_llm)
    stream = smol.client.chat.completions.create(model="smol-gsm8k", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    completion = smol.client.completions.create(model="smol-gsm8k", prompt="The capital of France is", max_tokens=6,
                                                temperature=0)
    ids = smol.pair.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    bos = [smol.pair.tokenizer.bos_token_id] if smol.pair.tokenizer.bos_token_id is not None else []
    assert completion.choices[0].text == smol.expected(bos + ids, max_tokens=6)[1]


def test_smol_16_concurrent_greedy_requests_equal_their_solo_decodes(smol):
    asks = [[{"role": "user", "content": f"What is {a} plus {b}? Answer briefly."}]
            for a, b in zip(range(2, 18), range(40, 24, -1), strict=True)]

    def ask(messages):
        return smol.client.chat.completions.create(model="smol-gsm8k", messages=messages, temperature=0, max_tokens=10)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, asks))
    for messages, reply in zip(asks, replies, strict=True):
        g, text = smol.expected(smol_prompt(smol, messages), max_tokens=10)
        assert reply.choices[0].message.content == text, messages
        assert reply.usage.completion_tokens == len(g.tokens)


# ---------------------------------------------------------------------------------------------
# Text out of tokens, without a server


def test_text_streams_whole_characters_and_cuts_at_a_stop_string_split_across_tokens(smol_world):
    from pipeline.models import load_tokenizer
    from pipeline.serving.service import TextStream

    tok = load_tokenizer(str(smol_world / "llm"))
    text = "Café 🙂 costs 3€. The answer is 42.\nDone"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 15 and tok.decode(ids) == text
    whole = TextStream(tok, [tok.eos_token_id], ())
    pieces = [whole.push([t]) for t in ids] + [whole.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    cut = TextStream(tok, [tok.eos_token_id], ("answer is 4", "never"))
    pieces = []
    for t in ids:
        pieces.append(cut.push([t]))
        if cut.stopped:
            break
    assert "".join(pieces) == "Café 🙂 costs 3€. The " and cut.stopped
    ended = TextStream(tok, [tok.eos_token_id], ("Don",))
    assert ended.push(ids[:3] + [tok.eos_token_id]) + ended.flush() == tok.decode(ids[:3])
