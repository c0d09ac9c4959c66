"""Tests for sft_pipeline.tokenization.verbatim: the syntax-tree proof that a template copies contents verbatim."""

from __future__ import annotations

import pytest

from sft_pipeline.tokenization.templates import resolve_template, shipped_templates
from sft_pipeline.tokenization.verbatim import template_writes_content_verbatim
from tests.unit.tokenization.samples import CONTENT_BRANCH, CONTENT_DEPENDENT


@pytest.mark.parametrize("template, verbatim", [
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] ~ '<|im_end|>\n' }}{% endfor %}", True),
    ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
     "{% else %}{{ m.content }}{% endif %}{% if loop.last and messages|length > 1 %}.{% endif %}{% endfor %}", True),
    ("{% if messages and messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}{% else %}"
     "{% set turns = messages %}{% endif %}{% for m in turns %}{{ m['content'] }}{% endfor %}", True),
    (CONTENT_DEPENDENT, False),
    (CONTENT_BRANCH, False),
    ("{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}", False),
    ("{% for m in messages %}{% filter upper %}{{ m['content'] }}{% endfilter %}{% endfor %}", False),
    ("{% for m in messages %}{% set b %}{{ m['content'] }}{% endset %}{{ b }}{% endfor %}", False),
    ("{{ messages | tojson }}", False),
    ("{% for m in messages %}{{ m }}{% endfor %}", False),
    ("{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{{ m['content'] }}{% if loop.nextitem['content'] %}!{% endif %}{% endfor %}", False),
    ("{% set ns = namespace(m=none) %}{% for m in messages %}{% set ns.m = m %}{% endfor %}{{ ns.m.content }}", False),
    ("{% for m in messages %}{{ m['content'] if m['role'] == 'user' else m['content'][:3] }}{% endfor %}", False),
    ("{% macro r(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ r(m['content']) }}{% endfor %}", False),
    ("{% for m in messages %}{{ (m['content'] + '.') | length }}{% endfor %}", False),
    # Found by review: the loop object reached other ways than loop.previtem / loop.nextitem ...
    ("{% for m in messages %}{{ m.content }}{% if loop['nextitem'] %}{{ loop['nextitem'].content|length }}{% endif %}"
     "{% endfor %}", False),
    ("{% for m in messages %}{% set l = loop %}{{ m.content }}{{ l.nextitem.content|length }}{% endfor %}", False),
    ("{% for m in messages recursive %}{{ m.content }}{% endfor %}", False),
    # ... and one name bound to the list and to a message, so x['content'] looked like a message.
    ("{% set x = messages %}{% set x = x[0] %}{% if x['content'] %}!{% endif %}", False),
    ("{% for m in messages %}{% set messages = m %}{{ messages['content']['split']()|length }}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content }}{% if m.tool_calls %}!{% endif %}{% endfor %}", False),
    ("{% set messages = messages[1:] %}{% for m in messages %}{{ m.content }}{% if loop.last %}.{% endif %}{% endfor %}",
     True),
])
def test_verbatim_proof(template, verbatim):
    assert template_writes_content_verbatim(template) is verbatim


def test_shipped_templates_are_proved_verbatim(tokenizer):
    texts = [resolve_template(tokenizer, name)[0] for name in ["tokenizer"] + shipped_templates()]
    assert all(template_writes_content_verbatim(t) for t in texts)
