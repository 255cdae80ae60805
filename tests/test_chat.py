"""Chat templates (gpt2s.chat) against transformers' ``AutoTokenizer.apply_chat_template`` on
the same tokenizer.json and tokenizer_config.json: templates shaped like real instruct
checkpoints' (SmolLM2-Instruct's and Qwen2.5-Instruct's ChatML, a Llama-2-style one with BOS,
EOS and ``raise_exception``, one with namespace, loop controls and the generation block),
written here; the same text and token ids, the same refusals.  Then ``python -m
gpt2s.generate --chat`` end to end: the reply transformers' greedy generate gives, ended at
generation_config.json's end tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_ckpt import make_tokenizer, save_hf

pytest.importorskip("jinja2", reason="chat templates need jinja2 (gpt2s[chat])")
pytest.importorskip("tokenizers", reason="the tokenizer.json needs tokenizers")
transformers = pytest.importorskip("transformers")

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# block tags on lines of their own (trim_blocks / lstrip_blocks matter), namespace(), break,
# the generation block, dict(), a template variable with a default
FANCY = """{% set ns = namespace(n=0, last='') %}
{% for m in messages %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <|im_start|>{{ m.role }}
    {% if m.role == 'assistant' %}
{% generation %}{{ m.content }}{% endgeneration %}
    {% else %}
{{ m.content | trim }}
    {% endif %}
<|im_end|>
{% endfor %}
{{ dict(turns=ns.n) | tojson }} {{ (extra or 'none') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ünïcödé ✓"}],
]


def _checkpoint_tokenizer(path, template, as_file=False, **tokens):
    """tokenizer.json + tokenizer_config.json (the template inside it, or in
    chat_template.jinja) in path."""
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 128, **tokens}
    if as_file:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def _ours(path):
    from gpt2s.chat import load_chat_template
    from gpt2s.vocab import FileTokenizer
    enc = FileTokenizer.from_file(path / "tokenizer.json")
    enc.chat_template = load_chat_template(path)
    return enc


@pytest.mark.parametrize("template", [SMOLLM2, QWEN25, LLAMA2, FANCY],
                         ids=["smollm2", "qwen2.5", "llama2", "fancy"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("as_file", [False, True], ids=["config", "jinja"])
def test_same_text_and_ids_as_transformers(tmp_path, template, conversation, as_file):
    from gpt2s.chat import apply_chat_template
    path = _checkpoint_tokenizer(tmp_path / "tok", template, as_file)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = _ours(path)
    messages = CONVERSATIONS[conversation]
    for gen in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        got = apply_chat_template(ours, messages, add_generation_prompt=gen)
        assert got == want
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        assert apply_chat_template(ours, messages, gen, tokenize=True) == list(ids)
    if template == QWEN25:   # the tools branch, tojson included
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        calls = messages + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "content": "sunny"}]
        want = hf.apply_chat_template(calls, tools=tools, tokenize=False,
                                      add_generation_prompt=True)
        assert apply_chat_template(ours, calls, tools=tools) == want
    if template == FANCY:    # a variable passed through
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      extra="yes")
        assert apply_chat_template(ours, messages, extra="yes") == want


def test_raise_exception_refuses_as_transformers_does(tmp_path):
    from gpt2s.chat import ChatTemplateError, apply_chat_template
    path = _checkpoint_tokenizer(tmp_path / "tok", LLAMA2)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="refused the conversation: Conversation "
                                                "roles must alternate"):
        apply_chat_template(_ours(path), bad)


def test_template_errors_name_the_file(tmp_path):
    from gpt2s.chat import ChatTemplateError, apply_chat_template, load_chat_template
    path = _checkpoint_tokenizer(tmp_path / "tok", "{% for m in messages %}{{ m.content }",
                                 as_file=True)
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: not a valid Jinja"):
        apply_chat_template(_ours(path), CONVERSATIONS[0])
    # several named templates: the one named default
    (path / "chat_template.jinja").unlink()
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "D{{ eos_token }}"}]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_chat_template(path).render(CONVERSATIONS[0]) == "D<|im_end|>"
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(path)
    # the sandbox: no way out through attributes
    t = load_chat_template(_checkpoint_tokenizer(tmp_path / "s", "{{ messages.__class__ }}"))
    assert t.render(CONVERSATIONS[0]) == ""
    t = load_chat_template(_checkpoint_tokenizer(
        tmp_path / "s2", "{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(ChatTemplateError, match="SecurityError|UndefinedError"):
        t.render(CONVERSATIONS[0])


def test_end_tokens(tmp_path):
    from gpt2s.chat import chat_end_tokens
    path = _checkpoint_tokenizer(tmp_path / "tok", SMOLLM2, eos_token="<|endoftext|>")
    enc = _ours(path)
    im_end = enc.tk.token_to_id("<|im_end|>")
    eot = enc.tk.token_to_id("<|endoftext|>")
    # the template's eos_token, and the end token the template writes; never <|im_start|>
    assert sorted(chat_end_tokens(enc)) == sorted([eot, im_end])
    enc.generation_config = {"eos_token_id": [7, 9]}
    assert chat_end_tokens(enc)[:2] == [7, 9]
    assert chat_end_tokens(enc, generation_config={"eos_token_id": 5})[0] == 5


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """A tiny Llama checkpoint with the SmolLM2-style template and a greedy reply that
    reaches an end token listed in generation_config.json."""
    torch = pytest.importorskip("torch")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    for seed in range(20):      # a random model whose greedy reply varies
        path = tmp_path_factory.mktemp("instruct") / "ckpt"
        hf, tk = save_hf(path, "llama", seed=seed)
        _checkpoint_tokenizer(path, SMOLLM2)
        hft = transformers.AutoTokenizer.from_pretrained(path)
        ids = hft.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = torch.tensor([list(ids)])
        hf.generation_config.eos_token_id = None
        with torch.no_grad():
            free = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
        # a token first made at the 3rd step or later ends the turn (as if it were the
        # model's <|im_end|>)
        later = [i for i in range(2, len(free)) if free.index(free[i]) == i]
        if later and tk.decode(free[:later[0]]).strip():
            break
    first = later[0]
    end = free[first]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, 299]}))
    hf2 = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
    with torch.no_grad():
        out = hf2.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    assert out[-1] == end and len(out) == first + 1
    return path, messages[0]["content"], tk.decode(out[:-1], skip_special_tokens=False)


def test_generate_chat_cli(instruct):
    path, message, reply = instruct
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model", str(path),
                        "--chat", message, "--temperature", "0", "-n", "12"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == reply + "\n"


def test_generate_chat_refusals(instruct, tmp_path):
    from gpt2s.generate import main
    path, message, _ = instruct
    assert main(["--model", str(path), "--chat", message, "hello"]) == 2
    plain = tmp_path / "plain"
    save_hf(plain, "llama", seed=1)
    assert main(["--model", str(plain), "--chat", message]) == 2


def test_model_carries_template_and_generation_end_tokens(instruct):
    """A model loaded from the directory: its tokenizer renders the template, and generate
    stops at generation_config.json's end tokens (a list) by default."""
    import gpt2s
    from gpt2s.chat import apply_chat_template, chat_end_tokens
    path, message, reply = instruct
    m = gpt2s.AutoModelForCausalLM.from_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert list(m.config.eos_token_id) == gen
    ids = apply_chat_template(m.tokenizer, [{"role": "user", "content": message}],
                              tokenize=True)
    out = m.generate(np.array([ids]), 12, temperature=0, stop_at_eos=True)
    new = out[0, len(ids):].tolist()
    assert new[-1] == gen[0] and m.tokenizer.decode(new[:-1]) == reply
    assert gen[0] in chat_end_tokens(m.tokenizer, m.config)
