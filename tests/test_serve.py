"""`k15 serve` for real: a checkpoint behind Ray Serve, called over HTTP on localhost through the
`openai` client, streaming and not, against direct greedy generation with the engine."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from k15.serve import openai_api as api

pytestmark = pytest.mark.slow


def test_bad_requests_name_the_field():
    def error(body, chat=False):
        with pytest.raises(api.RequestError) as e:
            api.parse(body, chat=chat, model_name="m", max_tokens_limit=64)
        return e.value

    assert error({"model": "m", "prompt": "x", "max_tokens": 0}).param == "max_tokens"
    assert error({"model": "m", "prompt": "x", "temperature": 3}).param == "temperature"
    assert error({"model": "m"}).param == "prompt"
    assert error({"model": "other", "prompt": "x"}).status == 404
    assert error({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, chat=True).param == "messages[0].role"
    ok = api.parse({"model": "m", "prompt": ["x"], "max_tokens": 5, "temperature": 0}, chat=False, model_name="m",
                   max_tokens_limit=64)
    assert ok.prompt == "x" and ok.max_tokens == 5 and ok.temperature == 0.0 and not ok.stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_policy(path, seed: int):
    from omegaconf import OmegaConf

    from k15.models import load_policy
    from k15.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    cfg = OmegaConf.create({"path": None, "tokenizer": None, "dtype": "float32", "hidden_size": 64, "num_layers": 2,
                            "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128, "max_position": 256})
    load_policy(cfg, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def start_server(ckpt, *extra: str):
    """`k15 serve` on a free port; (base URL, process) once /v1/models answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = ckpt.parent / f"serve-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "k15.cli", "serve", f"model.path={ckpt}", f"serve.port={port}",
                             "serve.stream_chunk=3", *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                if r.status == 200:
                    return base, proc
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "k15 serve did not come up in 4 minutes"
        time.sleep(0.5)


def stop_server(proc) -> None:
    proc.terminate()
    proc.wait(timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = save_policy(tmp_path_factory.mktemp("serve") / "policy", seed=3)
    base, proc = start_server(ckpt)
    yield base, ckpt
    stop_server(proc)


def direct_greedy(ckpt, prompt: str, max_tokens: int) -> str:
    from k15.models.model import load_pretrained
    from k15.models.tokenizer import load_tokenizer
    from k15.rollout.engine import GenerationRequest, SamplingParams
    from k15.rollout.torch_engine import TorchEngine

    tokenizer = load_tokenizer(ckpt)
    engine = TorchEngine(load_pretrained(ckpt), tokenizer.eos_token_id, tokenizer.pad_token_id)
    [out] = engine.generate([GenerationRequest(tokenizer(prompt)["input_ids"])],
                            SamplingParams(temperature=0.0, max_response_tokens=max_tokens))
    return tokenizer.decode(out.tokens, skip_special_tokens=True)


def test_completions_match_the_engine_streamed_or_not(server):
    from openai import OpenAI

    base, ckpt = server
    client = OpenAI(base_url=base, api_key="unused")
    [model] = [m.id for m in client.models.list().data]
    assert model == "policy"
    prompt = "Compute 3 + 4 * 2."
    want = direct_greedy(ckpt, prompt, 20)
    assert want  # the untrained model still writes something
    out = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 20
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    chunks = [c.choices[0].text for c in streamed]
    assert len(chunks) > 2 and "".join(chunks) == want


def test_chat_completions_match_the_engine_streamed_or_not(server):
    from openai import OpenAI

    base, ckpt = server
    client = OpenAI(base_url=base, api_key="unused")
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    from k15.models.tokenizer import load_tokenizer

    want = direct_greedy(ckpt, api.chat_prompt(load_tokenizer(ckpt), messages), 16)
    out = client.chat.completions.create(model="policy", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    streamed = client.chat.completions.create(model="policy", messages=messages, max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want


def test_bad_requests_get_4xx_with_a_message(server):
    import openai
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="policy", prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": 5}], max_tokens=4)
    request = urllib.request.Request(f"{base}/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_served_weights_follow_a_training_run(tmp_path):
    from openai import OpenAI

    from k15 import checkpoint

    first = save_policy(tmp_path / "policy", seed=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base, proc = start_server(first, f"serve.follow={run_dir}")
    try:
        client = OpenAI(base_url=base, api_key="unused")
        prompt = "Compute 3 + 4 * 2."
        ask = lambda: client.completions.create(model="policy", prompt=prompt, max_tokens=12, temperature=0)  # noqa: E731
        assert ask().choices[0].text == direct_greedy(first, prompt, 12)
        with urllib.request.urlopen(f"{base}/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["k15_weights"] == {"version": 0, "checkpoint": None}
        with checkpoint.writing(run_dir, 5, keep=3) as tmp:  # the training run saves iteration 5
            save_policy(tmp / "model", seed=11)
        newest = checkpoint.list_checkpoints(run_dir)[-1]
        with urllib.request.urlopen(f"{base}/models", timeout=30) as r:
            weights = json.loads(r.read())["data"][0]["k15_weights"]
        assert weights == {"version": 5, "checkpoint": str(newest)}
        assert ask().choices[0].text == direct_greedy(newest / "model", prompt, 12)
    finally:
        stop_server(proc)
