"""The `captioner.command` backend: a local program that reads an image path and prints a caption.

The command line is split like a shell would (shlex); the image's absolute path
replaces `{image}`, or is appended when there is no `{image}`. The rendered prompt,
trigger and concept id are in the environment (SD3EXP_PROMPT, SD3EXP_TRIGGER,
SD3EXP_CONCEPT) for programs that use them. Its stdout is the caption; a non-zero
exit, an empty output or a run past captioner.timeout_s fails that image only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List

from sd3exp.caption.client import Answer, ImageFailed
from sd3exp.errors import ConfigError

PLACEHOLDER = "{image}"


def command_words(command: str) -> List[str]:
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise ConfigError("captioner.command", command, f"cannot be split into words ({e})",
                          "quote it as a shell would, e.g. captioner.command='python tag.py --onnx'") from None
    if not words:
        raise ConfigError("captioner.command", command, "is empty", "name a program, e.g. 'python tag.py'")
    return words


def argv_for(words: List[str], image: Path) -> List[str]:
    path = str(image.absolute())
    if any(PLACEHOLDER in w for w in words):
        return [w.replace(PLACEHOLDER, path) for w in words]
    return [*words, path]


def run_command(words: List[str], image: Path, env: Dict[str, str], timeout_s: float) -> Answer:
    argv = argv_for(words, image)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout_s, env={**os.environ, **env},
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ImageFailed("command not found", f"{argv[0]!r} is not a program on PATH",
                          "give captioner.command the program's full path") from None
    except subprocess.TimeoutExpired:
        raise ImageFailed("timeout", f"{shlex.join(argv)} ran longer than {timeout_s:g} s",
                          "raise captioner.timeout_s or lower captioner.workers") from None
    err = done.stderr.decode("utf-8", "replace").strip()[-500:]
    if done.returncode != 0:
        raise ImageFailed(f"command failed (exit {done.returncode})", err or "(no output on stderr)",
                          f"run it by hand to see why: {shlex.join(argv)}")
    text = done.stdout.decode("utf-8", "replace")
    if not text.strip():
        raise ImageFailed("response without text", f"the command printed nothing{': ' + err if err else ''}",
                          f"run it by hand: {shlex.join(argv)}")
    return Answer(text)
