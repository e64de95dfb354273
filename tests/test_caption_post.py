"""Post-processing of a captioner's answer, prompt templates, and reading a chat completion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd3exp.caption.client import ImageFailed, answer_of
from sd3exp.caption.post import PostSettings, postprocess, starts_with_trigger, strip_boilerplate
from sd3exp.caption.prompts import PRESETS, compile_prompt, render
from sd3exp.errors import ConfigError
from sd3exp.tag_shuffle import estimate_clip_tokens, split_tags

COMMA = PostSettings("k4s4", ",")


@pytest.mark.parametrize("raw, want", [
    ("This image shows a red circle on a blue background.", "a red circle on a blue background."),
    ("The image depicts two cats", "two cats"),
    ("In this picture, we see a dog", "a dog"),
    ("Sure! Here is a descriptive caption: A castle at dusk", "A castle at dusk"),
    ("The image is a photograph of trees", "a photograph of trees"),
    ("Caption: 1girl, red hair", "1girl, red hair"),
    ("A picture of the image shows", "A picture of the image shows"),  # only openings are stripped
])
def test_boilerplate_openings_are_stripped(raw, want):
    assert strip_boilerplate(raw) == want


def test_trigger_first_separator_enforced_one_line():
    assert postprocess("This image shows a cat,\nblue sky ,  grass", COMMA) == "k4s4, a cat, blue sky, grass"
    assert postprocess("k4s4, a cat", COMMA) == "k4s4, a cat"  # already first: not repeated
    assert postprocess("k4s4x, a cat", COMMA) == "k4s4, k4s4x, a cat"  # a longer word is not the trigger
    assert postprocess("red hair blue eyes\nsmile", PostSettings("k4s4", " ")) == "k4s4 red hair blue eyes smile"
    assert postprocess("a cat", PostSettings("k4s4", ",", add_trigger=False)) == "a cat"


def test_max_length_keeps_whole_tags_then_cuts_words():
    s = PostSettings("k4s4", ",", max_length=8)
    assert postprocess("a red cat, a blue dog, grass", s) == "k4s4, a red cat"
    assert postprocess("one two three four five six seven eight nine", s) == "k4s4, one two three four five six"


OPENINGS = ["This image shows ", "Sure! ", "In this picture, ", "Here is a caption: ", '"', "k4s4", "k4s4, "]
tags = st.lists(st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
                          st.sampled_from(OPENINGS)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(tags, st.sampled_from([",", " ", ".", ";"]), st.one_of(st.none(), st.integers(2, 40)))
def test_postprocess_properties(parts, sep, limit):
    s = PostSettings("k4s4", sep, max_length=limit)
    raw = "".join(parts[:2]) + "\n".join(parts[2:])
    out = postprocess(raw, s)
    assert "\n" not in out and starts_with_trigger(out, "k4s4")
    if limit is not None:
        assert estimate_clip_tokens(out) <= max(limit, estimate_clip_tokens(split_tags(out, sep)[0]))
    assert postprocess(out, s) == out  # idempotent: re-applying the settings changes nothing


def test_presets_render_with_every_variable():
    for name in PRESETS:
        text = render(compile_prompt(name), "k4s4", "fantasy", ["castle", "dusk"], "a.png")
        assert "castle, dusk" in text
    assert "fantasy" in render(compile_prompt("descriptive"), "k4s4", "fantasy", [], "a.png")
    custom = compile_prompt("Tag {{ image }} for {{ trigger }}{% for t in tags %} +{{ t }}{% endfor %}")
    assert render(custom, "k4s4", "n", ["x"], "a.png") == "Tag a.png for k4s4 +x"


def test_unknown_template_variable_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        compile_prompt("Describe {{ subject }}")
    assert e.value.field == "captioner.prompt" and "subject" in e.value.problem


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": [{"message": {"content": "  "}}]},
                                  {"choices": [{"message": {"content": None}}]}, ["x"]])
def test_answers_without_text_fail(body):
    with pytest.raises(ImageFailed) as e:
        answer_of(body)
    assert e.value.kind == "response without text"


def test_answer_text_parts_and_usage():
    body = {"choices": [{"message": {"content": [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]}}],
            "usage": {"total_tokens": 7}}
    answer = answer_of(body)
    assert (answer.text, answer.tokens) == ("a cat", 7)


def test_only_quotes_around_the_whole_answer_are_removed():
    assert strip_boilerplate('"A cat on a mat"') == "A cat on a mat"
    assert postprocess('a 12" record', COMMA) == 'k4s4, a 12" record'
