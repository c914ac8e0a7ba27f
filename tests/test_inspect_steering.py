"""`--steer FILE:LAYER:SCALE` through the commands people use: `ossgpt generate` and `ossgpt
serve` answering the real `openai` client, on nano."""

from __future__ import annotations

import openai
import pytest
import torch

import ossgpt
from ossgpt.cli import main
from ossgpt.inspect import SteeringVector, difference_of_means
from ossgpt.tokenizer import Tokenizer

from conftest import run_server

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory) -> str:
    net = ossgpt.load("nano", device="cpu", dtype=torch.float32, progress=False)
    tok = Tokenizer()
    vec = difference_of_means(net, [tok.encode("Paris Paris Paris France")], [tok.encode("weather rain sun cloud")], layer=1)
    path = tmp_path_factory.mktemp("steer") / "france.safetensors"
    SteeringVector(vec, 1).save(path)
    return str(path)


def generate(capsys, *args: str) -> tuple[str, str]:
    main(["generate", "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0",
          "--dtype", "float32", "--device", "cpu", *args])
    out = capsys.readouterr()
    return out.out, out.err


def test_generate_steered_at_zero_is_unsteered_and_at_scale_differs(capsys, vector_file):
    plain, _ = generate(capsys)
    assert generate(capsys, "--steer", f"{vector_file}:1:0")[0] == plain
    steered, err = generate(capsys, "--steer", f"{vector_file}::12")
    assert steered != plain and steered.startswith(PROMPT)
    assert "steering: france.safetensors x 12 after block 1" in err


def test_bad_steer_specs_are_one_line_errors_before_loading(capsys, vector_file, tmp_path):
    for spec, message in [(f"{tmp_path}/none.safetensors", "no such steering vector file"),
                          (f"{vector_file}:x:1", "expected FILE:LAYER:SCALE"),
                          (f"{vector_file}:7:1", "layer 7 does not exist: the model has layers 0..3")]:
        with pytest.raises(SystemExit) as exit_:
            generate(capsys, "--steer", spec)
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err)


def test_serve_steered_answers_the_openai_client_steered(vector_file):
    def complete(url: str) -> str:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        return client.completions.create(model="nano", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text

    with run_server("--dtype", "float32") as url:
        plain = complete(url)
    with run_server("--dtype", "float32", "--steer", f"{vector_file}::12") as url:
        steered = complete(url)
    assert steered != plain
