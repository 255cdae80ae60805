"""Chat templates: an instruct checkpoint's ``chat_template`` (a Jinja template in its
tokenizer_config.json, or in chat_template.jinja beside it, as transformers 5 writes it) turned
into the prompt text the model was trained on, as transformers' ``apply_chat_template`` renders
it, and the end tokens that close the model's turn.

    from gpt2s import AutoModelForCausalLM
    from gpt2s.chat import apply_chat_template, chat_end_tokens

    m = AutoModelForCausalLM.from_pretrained("SmolLM2-135M-Instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = apply_chat_template(m.tokenizer, messages)     # "<|im_start|>user\\n...assistant\\n"
    ids = apply_chat_template(m.tokenizer, messages, tokenize=True)
    out = m.generate([ids], 64, temperature=0, stop_at_eos=True,
                     eos_token_id=chat_end_tokens(m.tokenizer, m.config))

The rendering is transformers': a sandboxed Jinja environment (``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension and the ``{% generation %}`` block), the
``tojson`` filter without HTML escaping, the globals ``raise_exception`` (a template's own
error, raised as `ChatTemplateError`), ``strftime_now``, ``dict`` and ``namespace``, the
variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special
tokens (``bos_token``, ``eos_token``, ...) of tokenizer_config.json; the text is tokenized without
adding special tokens (the template writes them).  Needs the ``jinja2`` package
(``pip install "gpt2s[chat]"``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

__all__ = ["ChatTemplate", "ChatTemplateError", "apply_chat_template", "chat_end_tokens",
           "load_chat_template", "read_generation_config", "SPECIAL_TOKEN_NAMES"]

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# the named special tokens a template sees, as transformers passes them
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_MAX_JSON_BYTES = 64 << 20
# a message's reasoning, under the names templates read it by
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered (its syntax, a file that is not
    what it should be), or that refused the messages with ``raise_exception``: the message
    says which."""


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken
    object ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ChatTemplateError(f"{path}: too large for a {path.name}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ChatTemplateError(f"{path}: not a JSON object")
    return d


class ChatTemplate:
    """A checkpoint's chat template with the special tokens it is rendered with.

    Args:
        template: the Jinja source.
        special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...}, the named special
            tokens of the tokenizer (as strings).
        source: where the template was read (named in errors).

    The template is compiled at the first `render` (which raises `ChatTemplateError` for a
    template Jinja cannot compile, ImportError without jinja2).

    Examples:
        >>> t = ChatTemplate("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
        ...                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        ...                  {"eos_token": "</s>"})
        >>> t.render([{"role": "user", "content": "Hi"}])
        '<|user|>Hi</s><|assistant|>'
    """

    def __init__(self, template: str, special_tokens: dict | None = None,
                 source: str = "chat_template"):
        if not isinstance(template, str):
            raise ChatTemplateError(f"{source}: the chat template is not a string")
        self.template = template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items()
                               if k in SPECIAL_TOKEN_NAMES and isinstance(v, str)}
        self.source = source
        self._compiled = None    # compiled at the first render: loading needs no jinja2

    @classmethod
    def from_pretrained(cls, directory) -> "ChatTemplate | None":
        """The chat template of a checkpoint directory, or None when it has none:
        chat_template.jinja beside the model (transformers 5), else tokenizer_config.json's
        ``chat_template`` (a string, or a list of named templates: the one named
        "default").  The special tokens come from tokenizer_config.json, else from
        special_tokens_map.json."""
        d = Path(directory)
        config = _read_json(d / TOKENIZER_CONFIG) if (d / TOKENIZER_CONFIG).is_file() else {}
        tokens = {}
        if (d / SPECIAL_TOKENS_MAP).is_file():
            tokens.update({k: _token_text(v)
                           for k, v in _read_json(d / SPECIAL_TOKENS_MAP).items()})
        tokens.update({k: _token_text(config[k]) for k in SPECIAL_TOKEN_NAMES if k in config})
        if (d / TEMPLATE_FILE).is_file():
            try:
                text = (d / TEMPLATE_FILE).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ChatTemplateError(f"{d / TEMPLATE_FILE}: not UTF-8 text") from None
            return cls(text, tokens, str(d / TEMPLATE_FILE))
        template = config.get("chat_template")
        source = f"{d / TOKENIZER_CONFIG}: chat_template"
        if template is None:
            return None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ChatTemplateError(f"{source}: several templates "
                                        f"({', '.join(map(str, named))}) and none named "
                                        f"'default'")
            template = named["default"]
        return cls(template, tokens, source)

    def render(self, messages, add_generation_prompt: bool = True, *, tools=None,
               documents=None, **kwargs) -> str:
        """The prompt text of a conversation (a list of {"role", "content", ...} dicts), as
        ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders it;
        add_generation_prompt (default True) ends it with the header of the assistant's
        turn.  kwargs reach the template as variables (e.g. ``enable_thinking=False``),
        over the special tokens.

        Raises:
            ChatTemplateError: the template refused the messages (its raise_exception), or
                failed on them (the message names the template).
            TypeError: a message that is not a dict.
        """
        if self._compiled is None:
            self._compiled = _compile(self.template, self.source)
        import jinja2
        if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        if not messages:
            raise ValueError("the conversation is empty: give at least one message")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                                f"{type(message).__name__}")
            # as transformers: None values dropped, the reasoning under its usual names
            message = {k: _plain(v) for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in _REASONING_FIELDS
                              if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._compiled.render(messages=chat, tools=_plain(tools),
                                         documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.source}: the chat template refused the "
                                    f"conversation: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: {type(e).__name__}: {e}") from None

    def __repr__(self):
        return f"ChatTemplate({self.source}, {len(self.template)} characters)"


def _plain(value):
    """Plain JSON-like data (what the sandbox is safe with), as transformers passes it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    item = getattr(value, "item", None)
    if callable(item):        # a NumPy scalar
        return _plain(item())
    return f"<{type(value).__name__}>"


class _TemplateRaised(Exception):
    pass


def _compile(template: str, source: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError(f"{source}: rendering a chat template needs jinja2 "
                          f"(pip install 'gpt2s[chat]')") from None

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: marks the assistant's text (for
        training masks); rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise _TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """namespace() without underscore attributes (no way to CPython's internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: not a valid Jinja template (line {e.lineno}: "
                                f"{e.message})") from None


def load_chat_template(directory) -> ChatTemplate | None:
    """`ChatTemplate.from_pretrained` (None when the checkpoint has no chat template)."""
    return ChatTemplate.from_pretrained(directory)


def _template_of(tokenizer) -> ChatTemplate:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("the model has no chat template: it is not an instruct checkpoint "
                         "(no chat_template in its tokenizer_config.json, no "
                         "chat_template.jinja beside it)")
    return template


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool = True, *,
                        tokenize: bool = False, tools=None, documents=None, **kwargs):
    """The prompt of a conversation for the model whose tokenizer this is (a model's
    ``tokenizer``, which carries the checkpoint's ``chat_template``): the text transformers'
    ``apply_chat_template`` renders, or with tokenize=True its token ids, encoded as
    transformers does (no special tokens added: the template writes them).

    Raises:
        ValueError: the tokenizer has no chat template.
        ChatTemplateError: the template refused or failed on the messages.
    """
    text = _template_of(tokenizer).render(messages, add_generation_prompt, tools=tools,
                                          documents=documents, **kwargs)
    if not tokenize:
        return text
    encode = getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
    return list(encode(text))


_END_NAME = re.compile(r"end|eot|</s>", re.IGNORECASE)
_NOT_END = re.compile(r"start|begin|bos", re.IGNORECASE)


def chat_end_tokens(tokenizer, config=None, generation_config: dict | None = None) -> list[int]:
    """The token ids that end the assistant's turn: generation_config.json's eos_token_id
    (one id or a list; ``generation_config``, else the one the tokenizer carries), the
    config's eos_token_id, the template's ``eos_token``, and the special tokens the template
    writes whose names say they end something (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ``</s>``)."""
    ids = []

    def add(value):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                ids.append(v)

    gen = generation_config if generation_config is not None else \
        getattr(tokenizer, "generation_config", None) or {}
    add(gen.get("eos_token_id"))
    if config is not None:
        add(getattr(config, "eos_token_id", None))
    template = getattr(tokenizer, "chat_template", None)
    tk = getattr(tokenizer, "tk", None)
    if template is not None and tk is not None:
        eos = template.special_tokens.get("eos_token")
        if eos is not None:
            add(tk.token_to_id(eos))
        for token in _special_tokens(tk):
            if token in template.template and _END_NAME.search(token) \
                    and not _NOT_END.search(token):
                add(tk.token_to_id(token))
    return ids


def _special_tokens(tk) -> list[str]:
    """The special added tokens of a tokenizers.Tokenizer."""
    try:
        decoder = tk.get_added_tokens_decoder()
    except AttributeError:
        return []
    return [t.content for t in decoder.values() if getattr(t, "special", False)]


def read_generation_config(directory) -> dict:
    """generation_config.json beside a checkpoint ({} when there is none)."""
    p = Path(directory) / GENERATION_CONFIG
    return _read_json(p) if p.is_file() else {}
