"""The public methods show their real parameters (help(), inspect.signature, editors)."""

from __future__ import annotations

import inspect

import pytest

from gpt2s import GPT2, GPT2Config
from gpt2s import generation


@pytest.mark.parametrize("name", ["generate", "generate_stream", "generate_text"])
def test_generate_methods_show_their_parameters(name):
    m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    method = inspect.signature(getattr(m, name))
    function = inspect.signature(getattr(generation, name))
    # the bound method lists exactly the function's parameters after `model`, with the same
    # defaults and kinds: nothing hidden behind *args/**kwargs
    assert list(method.parameters.values()) == list(function.parameters.values())[1:]
    for p in method.parameters.values():
        assert p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD), (name, p)
    assert "temperature" in method.parameters and "top_k" in method.parameters
    doc = inspect.getdoc(getattr(m, name))
    assert "Example" in doc and len(doc) > 200


def test_forward_keyword_only_options():
    sig = inspect.signature(GPT2.forward)
    assert sig.parameters["return_logits"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["for_backward"].default is True
