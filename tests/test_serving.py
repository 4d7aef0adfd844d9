"""The OpenAI-compatible server as a real process on a free localhost port, driven by the official `openai` client."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/serve/test.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self):
        self.port = _free_port()
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = ""  # one CPU device is all the server needs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.serve", f"--config={CONFIG}", f"--config.port={self.port}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not come up within 240 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_stop_strings_cut_text_and_tokens():
    """A stop string ends the choice: the text before it, the tokens before it, finish_reason "stop"."""
    from framework.models import lm
    from framework.routing.table import Model
    from framework.serving import Engine, Row
    from framework.serving.engine import Sampling
    from framework.tasks import tokenizer as tok

    cfg = lm.LMConfig(vocab_size=24, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=8)
    engine = Engine({"m": Model("m", None, cfg)})
    try:
        ids = tok.encode("12=3\nA 3\n")
        row = Row(ids, -np.arange(len(ids), dtype=np.float32), False)
        c = engine._choice("m", row, Sampling(16, 0.0, None, 1, None, ("=",)), 5)
        assert (c.text, c.tokens, c.finish_reason) == ("12", ("1", "2"), "stop")
        assert c.logprobs == (0.0, -1.0)
        c = engine._choice("m", row, Sampling(16, 0.0, None, 1, None, ("zz",)), 5)
        assert (c.text, c.finish_reason, len(c.tokens)) == ("12=3\nA 3\n", "length", len(ids))
    finally:
        engine.close()


def test_models_lists_models_and_routers(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [
        "tiny-a",
        "tiny-b",
        "router-difficulty-0.5",
        "router-difficulty-utility-0.5",
        "router-random-0.5",
        "router-random-utility-0.5",
    ]


def test_completion_is_generate(client):
    """Greedy text and usage equal a direct `generate` call on the same weights."""
    from configs.serve import test as test_config
    from experiments import routing
    from framework import inference
    from framework.tasks import data
    from framework.tasks import tokenizer as tok

    models = {m.name: m for m in routing.build_models(test_config.get_config(), None)}
    prompt = "Q 3+4*2\n"
    r = client.completions.create(model="tiny-a", prompt=prompt, max_tokens=6, temperature=0)
    ids = data.encode_text_prompt(prompt)
    m = models["tiny-a"]
    out = inference.generate(m.params, m.cfg, [ids], max_new_tokens=6)
    n = int(out.lengths[0])
    assert r.choices[0].text == tok.decode(np.asarray(out.tokens[0, :n]))
    assert r.model == "tiny-a"
    assert r.usage.prompt_tokens == len(ids) == 9
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == len(ids) + n
    assert r.choices[0].finish_reason == ("stop" if n < 6 else "length")


def test_chat_stream_n_seed_logprobs(client):
    msgs = [{"role": "user", "content": "3+4"}]
    chat = client.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    # The chat is the arithmetic prompt "Q 3+4\n": the completion of that prompt is the same text.
    same = client.completions.create(model="tiny-b", prompt="Q 3+4\n", max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == same.choices[0].text
    stream = client.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=5, temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == same.choices[0].text
    kw = dict(model="tiny-a", prompt="Q 1+2\n", max_tokens=6, temperature=1.0, n=3, seed=5, logprobs=1)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed fixes the samples
    assert len({c.text for c in a.choices}) > 1  # the n samples draw with their own keys
    for c in a.choices:
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) and all(
            lp <= 0 for lp in c.logprobs.token_logprobs
        )
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    st = client.completions.create(model="tiny-a", prompt="Q 1+2\n", max_tokens=6, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in st)
    assert (
        text == client.completions.create(model="tiny-a", prompt="Q 1+2\n", max_tokens=6, temperature=0).choices[0].text
    )


def test_router_model_names_the_answering_model(client):
    r = client.chat.completions.create(
        model="router-random-0.5", messages=[{"role": "user", "content": "1+2"}], max_tokens=4, temperature=0
    )
    assert r.model in ("tiny-a", "tiny-b")
    assert r.model_extra["routed_by"] == "router-random-0.5"
    # Any threshold works; 0 always picks the cheapest model, 1 (never reached by random probabilities) the dearest.
    lo = client.completions.create(model="router-difficulty-0", prompt="Q 1+2\n", max_tokens=2)
    hi = client.completions.create(model="router-random-1.0", prompt="Q 1+2\n", max_tokens=2)
    assert (lo.model, hi.model) == ("tiny-a", "tiny-b")
    both = client.completions.create(model="router-random-1.0", prompt=["Q 1+2\n", "Q 3+4\n"], max_tokens=2)
    assert [c.model_extra["model"] for c in both.choices] == ["tiny-b", "tiny-b"]  # one routing call, every prompt
    # The utility rule at any price: a price far above any probability gap buys the cheapest model.
    cheap = client.completions.create(model="router-random-utility-1000", prompt="Q 1+2\n", max_tokens=2)
    assert cheap.model == "tiny-a" and cheap.model_extra["routed_by"] == "router-random-utility-1000"


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Q 1\n")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-a", prompt="Q 3+x\n")
    assert "'x'" in e.value.message and "position 4" in e.value.message and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="router-random-0.5", messages=[{"role": "user", "content": "3+é"}])
    assert "'é'" in e.value.message and "position 4" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-a", prompt="Q 1+2\n", max_tokens=1000)
    assert e.value.body["param"] == "max_tokens" and "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-a", prompt="Q 1+2\n", temperature=5)
    assert e.value.body["param"] == "temperature"
    bad = httpx.post(
        server.url + "/v1/completions",
        content=b'{"model": "tiny-a", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert bad.status_code in (400, 422) and bad.json()["error"]["type"] == "invalid_request_error"


def test_disconnect_mid_stream_and_concurrent_batching(client, server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "tiny-a", "prompt": "Q 1+2\n", "max_tokens": 8, "temperature": 0, "stream": True},
    ) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # closed after one event: the server keeps serving
    calls0 = httpx.get(server.url + "/health").json()["generate_calls"]
    prompts = [f"Q {i}+{i}\n" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(
            pool.map(
                lambda p: client.completions.create(model="tiny-b", prompt=p, max_tokens=4, temperature=0), prompts
            )
        )
    assert all(o.choices[0].finish_reason in ("stop", "length") for o in outs)
    calls = httpx.get(server.url + "/health").json()["generate_calls"] - calls0
    assert 1 <= calls < len(prompts)  # concurrent requests shared generate calls


def test_graceful_shutdown_finishes_in_flight(server, client):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            client.completions.create, model="tiny-a", prompt="Q 2+2\n", max_tokens=8, n=4, temperature=0.5, seed=1
        )
        time.sleep(0.05)
        rc = server.stop()
        assert len(fut.result().choices) == 4
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down gracefully


def test_batcher_window_collects_a_burst():
    """A batch stays open while requests keep coming within window_s of each other, up to max_wait_s."""
    from framework.serving.batcher import Batcher, Job, Row

    class Recording(Batcher):
        def generate(self, jobs):
            self.sizes.append(len(jobs))
            return [[Row(np.zeros(1, np.int32), np.zeros(1), True) for _ in j.prompts] for j in jobs]

    def burst(batcher, n, gap_s):
        futs = []
        for i in range(n):
            futs.append(batcher.submit(Job("m", [np.ones(2, np.int32)], [i], 1, 0.0, None)))
            time.sleep(gap_s)
        return [f.result(30) for f in futs]

    # 5 jobs 0.3 s apart span 1.2 s, longer than the window: one batch all the same.
    b = Recording({}, window_s=1.0, max_wait_s=30.0)
    b.sizes = []
    burst(b, 5, 0.3)
    b.close()
    assert b.sizes == [5]
    # The first job's wait is bounded: the burst is cut after max_wait_s.
    b = Recording({}, window_s=1.0, max_wait_s=1.0)
    b.sizes = []
    burst(b, 8, 0.3)
    b.close()
    assert len(b.sizes) >= 2 and sum(b.sizes) == 8
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher({}, window_s=0.1, max_wait_s=0.05)
