"""Text normalization: NFKC, whitespace, markup remnants, code kept as is."""

from sft_pipeline.curation.normalize import normalize_text


def test_normalize_text_nfkc_whitespace_markup_but_keeps_code_indentation():
    assert normalize_text("ｆｕｌｌ\u200bwidth  \r\n\r\n\r\n\r\nnext  ") == "fullwidth\n\nnext"
    assert normalize_text("Hello<br>there &amp; <b>you</b>  now") == "Hello\nthere & you now"
    code = "```python\ndef f():\n    return '<b>'\n```"
    assert normalize_text(code) == code


def test_markup_remnants_are_stripped():
    text = "<div><p>Intro</p><!-- tracking --><script>var x = 1;</script><a href='x'>link</a> &lt;tag&gt; &nbsp;end</div>"
    out = normalize_text(text)
    assert "<" not in out.replace("<tag>", "") and "tracking" not in out and "var x" not in out and "link" in out
