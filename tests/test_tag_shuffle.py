"""Caption tags: the splitting rule, the keep-N shuffle, seeds and SimpleTuner's caption_shuffle block."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd3exp import tag_shuffle
from sd3exp.errors import ConfigError
from sd3exp.schema import CaptionsConfig, ConceptConfig

SEPARATORS = [",", ";", "|", "."]
tag = st.text(st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=12)


def clean_tags(sep: str):
    """Lists of stripped, non-empty tags that do not contain `sep`."""
    return st.lists(tag.map(lambda t: t.replace(sep, "").strip()).filter(bool), max_size=12)


@st.composite
def caption_of(draw, sep: str):
    """(tags, a caption of them with random spacing and empty pieces)."""
    tags = draw(clean_tags(sep))
    pieces = []
    for t in tags:
        pieces += [" " * draw(st.integers(0, 2))] * draw(st.integers(0, 1))  # empty tags
        pieces.append(" " * draw(st.integers(0, 2)) + t + " " * draw(st.integers(0, 2)))
    return tags, sep.join(pieces)


def concept(**cap) -> ConceptConfig:
    return ConceptConfig(id="art", path="x", trigger="k4s4", repeats=10, captions=CaptionsConfig(**cap))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SEPARATORS).flatmap(lambda s: st.tuples(st.just(s), caption_of(s))),
       st.integers(0, 15), st.integers(0, 2**32))
def test_first_n_tags_stay_the_rest_is_a_permutation(sep_case, keep, seed):
    sep, (tags, caption) = sep_case
    out = tag_shuffle.split_tags(tag_shuffle.shuffle_caption(caption, keep, random.Random(seed), sep), sep)
    assert out[:keep] == tags[:keep]
    assert sorted(out[keep:]) == sorted(tags[keep:])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SEPARATORS).flatmap(lambda s: st.tuples(st.just(s), caption_of(s))))
def test_split_strips_and_drops_empty_tags(sep_case):
    sep, (tags, caption) = sep_case
    assert tag_shuffle.split_tags(caption, sep) == tags


@settings(max_examples=100, deadline=None)
@given(caption_of(","), st.integers(0, 5), st.integers(0, 2**64 - 1))
def test_same_seed_same_output(case, keep, seed):
    _, caption = case
    first = tag_shuffle.shuffle_caption(caption, keep, random.Random(seed))
    assert tag_shuffle.shuffle_caption(caption, keep, random.Random(seed)) == first


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_comma_split_equals_simpletuners_on_single_lines(text):
    """prompts.py CaptionShuffler: [p.strip() for p in caption.split(',') if p.strip()]."""
    line = text.replace("\n", " ")
    assert tag_shuffle.split_tags(line) == [p.strip() for p in line.split(",") if p.strip()]


def test_joined_with_separator_and_space():
    rng = random.Random(0)
    assert tag_shuffle.shuffle_caption("a,b", 2, rng) == "a, b"
    assert tag_shuffle.shuffle_caption("a.  b.", 5, rng, ".") == "a. b"
    assert tag_shuffle.shuffle_caption("a   b\nc", 3, rng, " ") == "a b c"
    assert tag_shuffle.shuffle_caption(" , ,", 2, rng) == ""


def test_line_breaks_split_tags_and_periods_do_not_by_default():
    assert tag_shuffle.split_tags("k4s4, sd 1.5 style\nred,\n\nblue") == ["k4s4", "sd 1.5 style", "red", "blue"]


@pytest.mark.parametrize("raw, sep", [(",", ","), (", ", ","), (" ; ", ";"), (" ", " "), ("   ", " "), (".", ".")])
def test_separator_normalised(raw, sep):
    assert tag_shuffle.tag_separator(concept(separator=raw)) == sep


@pytest.mark.parametrize("raw", ["", "\n", "\t"])
def test_empty_separator_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="separator"):
        tag_shuffle.tag_separator(concept(separator=raw))


def test_copy_seed_is_sha256_based_and_distinct_per_copy():
    key = "42\x00art\x00img.png\x003"
    expected = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    assert tag_shuffle.copy_seed(42, "art", "img.png", 3) == expected
    seeds = {tag_shuffle.copy_seed(42, c, f, i) for c in ("a", "b") for f in ("x.png", "y.png") for i in range(10)}
    assert len(seeds) == 40


def test_native_block_matches_simpletuner_keys():
    block = tag_shuffle.native_shuffle_block(concept(shuffle=True, keep_tags=2), seed=42)
    assert block == {"enable": True, "count": 10, "seed": 42, "split_on": "comma", "position_start": 2,
                     "include_original": False}
    custom = tag_shuffle.native_shuffle_block(concept(shuffle=True, variants=3, seed=7, separator="."), seed=42)
    assert (custom["count"], custom["seed"], custom["split_on"]) == (3, 7, "period")
    assert tag_shuffle.native_shuffle_block(concept(shuffle=True, separator=" "), 0)["split_on"] == "space"


def test_native_block_absent_when_off_or_materialized():
    assert tag_shuffle.native_shuffle_block(concept(shuffle=False), 1) is None
    assert tag_shuffle.native_shuffle_block(concept(shuffle=True, mode="materialized"), 1) is None


def test_native_block_rejects_what_simpletuner_cannot_split():
    with pytest.raises(ConfigError, match="materialized"):
        tag_shuffle.native_shuffle_block(concept(shuffle=True, separator=";"), 1)
    with pytest.raises(ConfigError, match="variants"):
        tag_shuffle.native_shuffle_block(concept(shuffle=True, variants=0), 1)


@pytest.mark.parametrize("cap, repeats", [({"shuffle": True}, 9), ({"shuffle": True, "mode": "materialized"}, 0),
                                          ({"shuffle": False, "mode": "materialized"}, 9)])
def test_simpletuner_repeats(cap, repeats):
    assert tag_shuffle.simpletuner_repeats(concept(**cap)) == repeats
