"""stage=review: review.html opened from disk in headless Chromium, captions shown as text."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser

import pytest

from tests import browser
from tests.openai_standin import serve
from tests.test_caption import TRIGGER, cli, make_images, sha
from tests.test_prepare import source_state

EVIL = '<script>alert("x")</script> "><img src=x onerror=alert(1)> & more'
CARDS_JS = ("JSON.stringify(Array.from(document.querySelectorAll('.card')).map(c => "
            "[c.dataset.concept, c.querySelector('.meta').textContent, c.querySelector('.caption').textContent, "
            "c.dataset.flags, c.querySelector('.edit').textContent]))")


def _filter_js(select: str, value: str) -> str:
    return (f"(() => {{ const s = document.getElementById('{select}'); s.value = '{value}'; "
            "s.dispatchEvent(new Event('change')); "
            "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).length; })()")


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1


@pytest.fixture
def reviewed(tmp_path):
    """A concept with a user caption (the injection), a duplicate image and generated captions; review.html."""
    src, run = tmp_path / "my src", tmp_path / "run"
    images = make_images(src, 5, captioned={0: EVIL, 1: f"{TRIGGER}, mine"})
    (src / "img04.png").write_bytes(images[3].read_bytes())  # a duplicate of img03
    before = source_state(src)
    with serve() as (url, _):
        assert cli(src, run, f"captioner.url={url}").returncode == 0  # img03 and img04 share one request
    done = cli(src, run, stage="review")
    assert done.returncode == 0, done.stderr
    assert f"review: {run / 'review.html'}" in done.stdout
    assert source_state(src) == before
    return src, run, images


def test_review_html_lists_every_image_with_source_flags_and_file_to_edit(reviewed):
    src, run, images = reviewed
    html = (run / "review.html").read_text()
    tags = Tags()
    tags.feed(html)
    assert tags.counts["script"] == 1  # the page's own filter script only
    assert tags.counts["img"] == 5  # the thumbnails only: the caption's <img> is text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &#34;&gt;&lt;img src=x onerror=alert(1)&gt; &amp; more" in html
    assert f"edit {src / 'img00.txt'}" in html
    assert "tag frequency" in html.lower() and "mine" in html


@pytest.mark.skipif(not browser.chromium() and os.environ.get("CI") != "true", reason="chromium is not installed")
def test_review_html_in_chromium(reviewed):
    src, run, images = reviewed
    page = browser.open_page(run / "review.html", evaluate=[
        CARDS_JS, _filter_js("flag", "missing-trigger"), _filter_js("flag", "duplicate"),
        _filter_js("source", "user"), _filter_js("flag", ""), "document.querySelectorAll('script').length"])
    assert page["errors"] == []
    assert len(page["images"]) == 5 and all(loaded for _, loaded in page["images"]), page["images"]
    cards, missing_trigger, duplicate, duplicate_and_user, users, scripts = page["values"]
    cards = json.loads(cards)
    by_image = {meta.split(" · ")[0].split(" / ")[1]: (caption, flags.split(), edit)
                for _, meta, caption, flags, edit in cards}
    assert by_image["img00.png"][0] == EVIL  # shown as text, exactly
    assert "missing-trigger" in by_image["img00.png"][1]
    assert by_image["img02.png"][0] == f"{TRIGGER}, a shape ({sha(images[2])[:8]}), plain background"
    assert "generated" in by_image["img02.png"][2] and str(src / "img02.txt") in by_image["img02.png"][2]
    assert {"duplicate", "same-caption"} <= set(by_image["img04.png"][1])
    assert (missing_trigger, duplicate, duplicate_and_user, users) == (1, 2, 0, 2)
    assert scripts == 1
