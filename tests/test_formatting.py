"""Prompt formats shared by teacher training and evaluation."""

import pytest

from llgbm_ext.data.formatting import FormatError, PromptFormat, candidates, context, target
from llgbm_ext.data.records import Example

MC = Example(prompt="Which is hot?\nA: ice\nB: fire", response="[B]", system="sys", choices=("ice", "fire"), answer=1)
BOOL = Example(prompt="is fire hot?", response="[True]", choices=("True", "False"), answer=0)
EXACT = Example(prompt="2 + 3 =", response="5", answer="5")


def test_plain_format_styles():
    cloze, letter = PromptFormat("option"), PromptFormat("letter")
    assert context(MC, cloze) == "Which is hot?\nA: ice\nB: fire\nAnswer:"
    assert candidates(MC, cloze) == [" ice", " fire"] and target(MC, cloze) == " fire"
    assert candidates(MC, letter) == [" [A]", " [B]"] and target(MC, letter) == " [B]"
    assert candidates(BOOL, letter) == [" [True]", " [False]"] and target(BOOL, cloze) == " True"
    assert target(EXACT, cloze) == " 5"
    bare = PromptFormat("cloze")
    assert context(MC, bare) == "Which is hot?\nAnswer:" and candidates(MC, bare) == [" ice", " fire"]
    assert context(BOOL, bare) == "is fire hot?\nAnswer:"  # no listed options: the prompt as is


def test_chat_format_uses_the_tokenizer_template(tiny_model):
    _, tokenizer = tiny_model
    fmt = PromptFormat("letter", chat_template=True, use_system=True)
    text = context(MC, fmt, tokenizer)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert target(MC, fmt) == "[B]"
    with pytest.raises(FormatError, match="needs a tokenizer"):
        context(MC, fmt, None)


def test_missing_gold_is_an_error():
    with pytest.raises(FormatError, match="without a gold index"):
        target(Example(prompt="q", response="", choices=("a", "b")), PromptFormat())
    with pytest.raises(FormatError, match="without a response"):
        target(Example(prompt="q", response=""), PromptFormat())
