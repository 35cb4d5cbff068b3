"""The chat template renders as llama-cpp-python's own Jinja2 formatter renders it for the same file."""

from __future__ import annotations

import pytest

from flashlm.errors import ChatTemplateError, InvalidOptionError
from flashlm.runtime.chat import ChatTemplate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


def test_render_matches_llama_cpp_python(model, smollm_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tmpl = model._loaded.file.get("tokenizer.chat_template")
    ref = Jinja2ChatFormatter(tmpl, eos_token=model.chat_template.eos_token,
                              bos_token=model.chat_template.bos_token)(messages=MESSAGES).prompt
    assert model.chat_template.render(MESSAGES) == ref


def test_default_system_prompt_when_none_given(model):
    text = model.chat_template.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_bad_messages_and_templates():
    t = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidOptionError):
        t.render([{"role": "user"}])
    with pytest.raises(InvalidOptionError):
        t.render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate(None)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="nope"):
        ChatTemplate("{{ raise_exception('nope') }}").render([{"role": "user", "content": "x"}])


HOSTILE = [  # (template, words the error must contain): templates are code from a downloaded file
    ('{{ "".__class__ }}', ["__class__", "unsafe"]),
    ('{{ "".__class__.__mro__[1].__subclasses__() }}', ["__class__", "unsafe"]),
    ("{{ messages.__class__.__base__ }}", ["__class__", "unsafe"]),
    ("{{ cycler.__init__.__globals__ }}", ["__init__", "unsafe"]),
    ("{{ raise_exception.__globals__['__builtins__'] }}", ["__globals__", "unsafe"]),
    ("{% set x = messages.append(1) %}", ["append"]),  # immutable sandbox: no mutating the caller's list
    ("{{ range(10**9) | list }}", ["Range too big"]),
    ("{{ 1 / 0 }}", ["ZeroDivisionError"]),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", ["RecursionError"]),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{{ 'x' * 64 }}{% endfor %}{% endfor %}",
     ["more than"]),
]


@pytest.mark.parametrize("source,words", HOSTILE)
def test_hostile_templates_fail_with_a_clear_error(source, words):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render(messages)
    assert "chat template" in str(info.value) and "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert messages == [{"role": "user", "content": "hi"}]
