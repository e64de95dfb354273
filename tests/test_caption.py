"""stage=caption against a stand-in OpenAI-compatible server (real HTTP on 127.0.0.1), the command
backend, the caption store and preparation on generated captions."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from PIL import Image

from sd3exp.caption.store import Store
from sd3exp.project import ROOT
from tests.helpers import needs_trainer, run_cli
from tests.openai_standin import State, serve
from tests.test_prepare import source_state

TRIGGER = "k4s4"  # the demo experiment's trigger


def make_images(folder: Path, n: int, captioned: Optional[Dict[int, str]] = None) -> List[Path]:
    """n distinct 64x64 PNGs img00.png ...; the indices in `captioned` get the user's caption."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", (64, 64), (i * 6 % 256, 255 - i * 5 % 256, 40)).save(path)
        paths.append(path)
        if captioned and i in captioned:
            path.with_suffix(".txt").write_text(captioned[i], encoding="utf-8")
    return paths


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(src: Path, run: Path, *extra: str, stage: str = "caption"):
    return run_cli("experiment=demo_quick", "demo=false", f"concepts.0.path={src}", f"hydra.run.dir={run}",
                   f"stage={stage}", "captioner.timeout_s=3", "captioner.retries=1", "captioner.backoff_s=0", *extra)


def stored(run: Path) -> Dict[str, str]:
    folder = Store(run / "captions", "shapes").dir
    return {p.stem: Store(run / "captions", "shapes").get(p.stem).caption for p in folder.glob("*.json")} \
        if folder.is_dir() else {}


def test_forty_images_three_fail_named_and_the_rerun_sends_only_those(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    images = make_images(src, 40)
    before = source_state(src)
    failing = {sha(images[3]): "500", sha(images[17]): "slow", sha(images[29]): "malformed"}
    state = State(behaviours={**failing, sha(images[8]): "429-once"}, slow_s=8)  # past timeout_s=3
    with serve(state) as (url, st):
        first = cli(src, run, f"captioner.url={url}", "captioner.model=joycaption", "captioner.workers=8")
        assert first.returncode != 0
        assert "3 of 40 image(s) sent got no caption" in first.stderr
        failed = [line for line in first.stdout.splitlines() if "FAILED" in line]
        assert len(failed) == 3
        assert any("img03.png" in f and "server error 500" in f and "CUDA out of memory" in f for f in failed)
        assert any("img17.png" in f and "timeout" in f and "captioner.timeout_s" in f for f in failed)
        assert any("img29.png" in f and "response without text" in f and "502 Bad Gateway" in f for f in failed)
        assert "37 captioned" in first.stdout and "tokens used" in first.stdout

        # every image arrived as its own bytes, base64 in an image_url part; the prompt names the trigger
        assert {r.sha256 for r in st.requests} == {sha(p) for p in images}
        assert all(TRIGGER in r.prompt and r.model == "joycaption" for r in st.requests)
        captions = stored(run)
        assert len(captions) == 37 and not set(failing) & set(captions)
        assert sha(images[8]) in captions  # the 429 was retried
        assert captions[sha(images[0])] == f"{TRIGGER}, a shape ({sha(images[0])[:8]}), plain background"

        st.requests.clear()
        again = cli(src, run, f"captioner.url={url}", "captioner.model=joycaption", "captioner.workers=8")
        assert again.returncode != 0 and "3 of 3 image(s)" in again.stderr
        assert {r.sha256 for r in st.requests} == set(failing)
        assert "37 reused" in again.stdout

        st.requests.clear()
        st.behaviours.clear()
        last = cli(src, run, f"captioner.url={url}", "captioner.model=joycaption")
        assert last.returncode == 0, last.stderr
        assert sorted(r.sha256 for r in st.requests) == sorted(failing)
        assert len(stored(run)) == 40
    assert source_state(src) == before  # the user's folder is byte-identical


def test_only_changed_or_new_images_are_sent_and_post_settings_apply_without_a_request(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    images = make_images(src, 4, captioned={0: f"{TRIGGER}, mine"})
    with serve() as (url, st):
        assert cli(src, run, f"captioner.url={url}").returncode == 0  # the only model served is used
        assert len(st.requests) == 3  # img00 has the user's caption (only_missing)
        st.requests.clear()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(images[1])  # changed
        Image.new("RGB", (64, 64), (9, 9, 9)).save(src / "new.png")
        done = cli(src, run, f"captioner.url={url}", "captioner.max_length=4")
        assert done.returncode == 0, done.stderr
        assert sorted(r.sha256 for r in st.requests) == sorted([sha(images[1]), sha(src / "new.png")])
        assert "2 reused" in done.stdout and "1 kept" in done.stdout
        short = stored(run)[sha(images[2])]
        assert short == f"{TRIGGER}, a shape", short  # re-post-processed from the raw answer, no request


def test_unreachable_server_and_unknown_model_are_named_with_a_fix(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    make_images(src, 2)
    with serve() as (url, _):
        port_url = url
    gone = cli(src, run, f"captioner.url={port_url}")
    assert gone.returncode != 0
    assert "unreachable" in gone.stderr and "captioner.url=http://HOST:PORT/v1" in gone.stderr
    with serve(State(models=["joycaption", "florence2"])) as (url, st):
        wrong = cli(src, run, f"captioner.url={url}", "captioner.model=llava")
        assert wrong.returncode != 0
        assert "captioner.model='llava'" in wrong.stderr and "joycaption, florence2" in wrong.stderr
        assert "captioner.model=joycaption" in wrong.stderr
        several = cli(src, run, f"captioner.url={url}")
        assert several.returncode != 0 and "serves several models" in several.stderr
        assert not st.requests
    neither = cli(src, run)
    assert neither.returncode != 0 and "captioner.url" in neither.stderr and "captioner.command" in neither.stderr


def test_rejected_image_and_empty_answer_fail_alone(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    images = make_images(src, 3)
    Image.new("RGB", (4000, 64), (5, 5, 5)).save(src / "wide.png")  # the stand-in's limit is 3000 pixels a side
    with serve(State(behaviours={sha(images[1]): "empty"})) as (url, _):
        done = cli(src, run, f"captioner.url={url}")
    assert done.returncode != 0 and "2 of 4" in done.stderr
    assert "wide.png: image rejected (400): Image too large: 4000x64" in done.stdout
    assert "img01.png: response without text" in done.stdout
    assert len(stored(run)) == 2


def test_command_backend_same_rules(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    images = make_images(src, 5)
    log = tmp_path / "calls.log"
    tagger = tmp_path / "tag.py"
    tagger.write_text(
        "import os, sys, pathlib\n"
        f"open({str(log)!r}, 'a').write(sys.argv[-1] + '\\n')\n"
        "name = pathlib.Path(sys.argv[-1]).name\n"
        "if name == 'img02.png' and not os.path.exists(sys.argv[-1] + '.ok'):\n"
        "    sys.exit('model file missing')\n"
        "print('1girl, ' + name.replace('.png', '') + ', ' + os.environ['SD3EXP_TRIGGER'])\n")
    command = f"captioner.command='{sys.executable} {tagger}'"
    first = cli(src, run, command, "captioner.workers=3")
    assert first.returncode != 0 and "1 of 5" in first.stderr
    assert "img02.png: command failed (exit 1): model file missing" in first.stdout
    captions = stored(run)
    assert captions[sha(images[0])] == f"{TRIGGER}, 1girl, img00, {TRIGGER}"
    assert len(captions) == 4
    log.write_text("")
    Path(str(images[2]) + ".ok").write_text("")
    again = cli(src, run, command)
    assert again.returncode == 0, again.stderr
    assert log.read_text().split() == [str(images[2])]


def prepared_captions(run: Path) -> Dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((run / "dataset" / "shapes").glob("*.txt"))}


def test_preparation_trains_on_generated_captions_and_keeps_the_users(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    mine = f"{TRIGGER}, red square, my own words"
    images = make_images(src, 6, captioned={0: mine})
    before = source_state(src)
    with serve() as (url, _):
        assert cli(src, run, f"captioner.url={url}").returncode == 0
        prepared = cli(src, run, stage="prepare")
        assert prepared.returncode == 0, prepared.stderr
        assert "5 with generated captions" in prepared.stdout
        got = prepared_captions(run)
        assert got["img00.txt"] == mine
        for p in images[1:]:
            assert got[p.with_suffix(".txt").name] == f"{TRIGGER}, a shape ({sha(p)[:8]}), plain background"
        assert (run / "dataset" / "shapes" / "img03.png").stat().st_ino == images[3].stat().st_ino

        # prefer=model: the generated caption wins over the user's (after captioning it too)
        assert cli(src, run, f"captioner.url={url}", "captioner.only_missing=false").returncode == 0
        flipped = cli(src, run, "captioner.prefer=model", stage="prepare")
        assert flipped.returncode == 0, flipped.stderr
        assert prepared_captions(run)["img00.txt"].startswith(f"{TRIGGER}, a shape")
    assert source_state(src) == before


def test_audit_sees_generated_captions(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    make_images(src, 3)
    assert cli(src, run, stage="audit").returncode != 0  # images without captions stop the audit
    with serve() as (url, _):
        assert cli(src, run, f"captioner.url={url}").returncode == 0
    audited = cli(src, run, stage="audit")
    assert audited.returncode == 0, audited.stderr
    assert '"generated_captions": [\n        "img00.png"' in (run / "audit.json").read_text()


@pytest.mark.parametrize("prompt, problem", [("Describe {{ trigr }}", "trigr"), ("{% if %}", "does not render")])
def test_prompt_template_errors_name_the_field(tmp_path, prompt, problem):
    src, run = tmp_path / "src", tmp_path / "run"
    make_images(src, 2)
    with serve() as (url, st):
        done = cli(src, run, f"captioner.url={url}", f"captioner.prompt='{prompt}'")
        assert not st.requests
    assert done.returncode != 0 and "captioner.prompt=" in done.stderr and problem in done.stderr


def test_interrupt_keeps_every_caption_received_and_says_how_to_continue(tmp_path):
    import signal
    import time

    src, run = tmp_path / "src", tmp_path / "run"
    images = make_images(src, 30)
    with serve(State(delay_s=0.3)) as (url, st):
        args = [sys.executable, "-m", "sd3exp", "experiment=demo_quick", "demo=false", f"concepts.0.path={src}",
                f"hydra.run.dir={run}", "stage=caption", f"captioner.url={url}", "captioner.workers=2"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(stored(run)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        kept = stored(run)  # every record on disk is whole (atomic writes)
        assert 4 <= len(kept) < 30, err
        assert "captioning stopped by SIGTERM" in err and "Traceback" not in err
        again = shlex.split(re.search(r"Continue with: (.+)", err).group(1))
        assert again[:3] == ["python", "-m", "sd3exp"] and "stage=caption" in again
        st.requests.clear()
        st.delay_s = 0
        assert subprocess.run([sys.executable, *again[1:]], capture_output=True).returncode == 0
        assert {r.sha256 for r in st.requests} == {sha(p) for p in images} - set(kept)


@pytest.mark.parametrize("where", ["inside", "around"])
def test_caption_store_never_goes_into_an_image_folder(tmp_path, where):
    src, run = tmp_path / "data" / "src", tmp_path / "run"
    make_images(src, 2)
    before = source_state(tmp_path / "data")
    out = src / "captions" if where == "inside" else tmp_path / "data"
    with serve() as (url, st):
        done = cli(src, run, f"captioner.url={url}", f"captioner.out_dir={out}")
        assert not st.requests
    assert done.returncode != 0 and "captioner.out_dir=" in done.stderr and "never writes to" in done.stderr
    assert source_state(tmp_path / "data") == before


@needs_trainer
@pytest.mark.slow
def test_demo_trains_on_generated_captions(tmp_path):
    """The demo dataset without captions: caption it, then the real SimpleTuner trains on the prepared copy."""
    from sd3exp.demo import DEMO_COUNTS
    from sd3exp.demo_data import make_demo_dataset

    src, run = tmp_path / "shapes", tmp_path / "run"
    make_demo_dataset(src, TRIGGER, DEMO_COUNTS, 42)
    for caption in src.glob("*.txt"):
        caption.unlink()
    before = source_state(src)
    with serve() as (url, _):
        assert cli(src, run, f"captioner.url={url}").returncode == 0
    if not (ROOT / "models" / "tiny-sd3").is_dir():  # the demo's model (demo=false does not build it)
        assert run_cli("make-tiny-model").returncode == 0
    trained = cli(src, run, stage="train")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert f"{sum(DEMO_COUNTS.values())} with generated captions" in trained.stdout
    assert (run / "training" / f"checkpoint-{json.loads((run / 'plan.json').read_text())['max_train_steps']}").is_dir()
    images = sorted(p for p in src.iterdir() if p.suffix == ".png")
    assert prepared_captions(run) == {p.with_suffix(".txt").name: f"{TRIGGER}, a shape ({sha(p)[:8]}), plain background"
                                      for p in images}
    assert source_state(src) == before


def test_api_key_from_the_environment(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    make_images(src, 2)
    with serve(State(api_key="s3cret")) as (url, st):
        unset = cli(src, run, f"captioner.url={url}", "captioner.api_key_env=SD3EXP_TEST_KEY")
        assert unset.returncode != 0 and "export SD3EXP_TEST_KEY=" in unset.stderr
        refused = cli(src, run, f"captioner.url={url}")
        assert refused.returncode != 0 and "401" in refused.stderr and "Invalid API key" in refused.stderr
        done = run_cli("experiment=demo_quick", "demo=false", f"concepts.0.path={src}", f"hydra.run.dir={run}",
                       "stage=caption", f"captioner.url={url}", "captioner.api_key_env=SD3EXP_TEST_KEY",
                       env={"SD3EXP_TEST_KEY": "s3cret"})
        assert done.returncode == 0, done.stderr
        assert len(st.requests) == 2 and "s3cret" not in (run / "resolved.yaml").read_text()
