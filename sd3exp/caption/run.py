"""stage=caption: every image of each concept (or those without a caption) through the captioner.

A thread pool of captioner.workers sends the requests; each caption is stored the
moment it arrives, so Ctrl-C or a crash loses nothing received. One image's failure
never stops the others: the stage lists each failed image with the captioner's own
message and a fix, then exits non-zero with the count; re-running sends only what
is still missing (and whatever is new or changed).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from sd3exp import console, tag_shuffle
from sd3exp.caption.client import Answer, CaptionError, ChatClient, ImageFailed
from sd3exp.caption.command import command_words, run_command
from sd3exp.caption.post import PostSettings, postprocess
from sd3exp.caption.prompts import compile_prompt, render
from sd3exp.caption.sources import post_settings
from sd3exp.caption.store import Record, Store, file_sha256, request_key
from sd3exp.errors import ConfigError, Interrupted
from sd3exp.images import list_images
from sd3exp.schema import CaptionerConfig, ConceptConfig, ExperimentConfig
from sd3exp.signals import Stopped, described, signum_of, sigterm_raises


@dataclass
class Task:
    concept: ConceptConfig
    image: Path
    sha256: str
    prompt: str
    request: Dict[str, Any]
    post: PostSettings


@dataclass
class Failure:
    concept: str
    image: Path
    error: ImageFailed

    def line(self) -> str:
        e = self.error
        return f"concept '{self.concept}': {self.image}: {e.kind}: {e.message}. Fix: {e.fix}"


@dataclass
class Summary:
    out_dir: Path
    captioned: int = 0
    reused: int = 0  # same image bytes and settings: the stored caption
    kept: int = 0  # the user's own caption (captioner.only_missing)
    failures: List[Failure] = field(default_factory=list)
    tokens: Optional[int] = None

    def line(self) -> str:
        used = f"{self.tokens} tokens used" if self.tokens is not None else "token use not reported"
        return (f"caption: {self.captioned} captioned, {self.reused} reused, {self.kept} kept (your own captions), "
                f"{len(self.failures)} failed; {used} -> {self.out_dir}")


class Backend(Protocol):
    base: Dict[str, Any]

    def ask(self, task: Task) -> Answer: ...


class ServerBackend:
    def __init__(self, c: CaptionerConfig, url: str) -> None:
        key = os.environ.get(c.api_key_env) if c.api_key_env else None
        if c.api_key_env and not key:
            raise ConfigError("captioner.api_key_env", c.api_key_env, "names an environment variable that is not set",
                              f"export {c.api_key_env}=<the server's API key>, or captioner.api_key_env=null")
        self.c, self.client = c, ChatClient(url, c.model, timeout_s=c.timeout_s, retries=c.retries,
                                            backoff_s=c.backoff_s, api_key=key, pool=c.workers)
        model = self.client.check_model()
        self.base = {"backend": "openai", "model": model, "system": c.system,
                     "max_new_tokens": c.max_new_tokens, "temperature": c.temperature}

    def ask(self, task: Task) -> Answer:
        return self.client.caption(task.image, self.c.system, task.prompt, self.c.max_new_tokens, self.c.temperature)


class CommandBackend:
    def __init__(self, c: CaptionerConfig, command: str) -> None:
        self.words, self.timeout = command_words(command), c.timeout_s
        self.base = {"backend": "command", "command": c.command}

    def ask(self, task: Task) -> Answer:
        env = {"SD3EXP_PROMPT": task.prompt, "SD3EXP_TRIGGER": task.concept.trigger, "SD3EXP_CONCEPT": task.concept.id}
        return run_command(self.words, task.image, env, self.timeout)


def backend_for(c: CaptionerConfig) -> Backend:
    if c.url and c.command:
        raise ConfigError("captioner.command", c.command, f"both captioner.url ({c.url}) and a command are set",
                          "keep one: captioner.url=null or captioner.command=null")
    if c.url:
        return ServerBackend(c, c.url)
    if c.command:
        return CommandBackend(c, c.command)
    raise ConfigError("captioner.url", None, "stage=caption needs a captioning server or program",
                      "add captioner.url=http://127.0.0.1:8000/v1 (an OpenAI-compatible vision server, e.g. "
                      "`vllm serve fancyfeast/llama-joycaption-beta-one-hf-llava`) or captioner.command='python tag.py'")


def check_out_dir(cfg: ExperimentConfig) -> None:
    """The caption store never goes into (or around) an image folder of the user's."""
    out = Path(cfg.captioner.out_dir).resolve()
    for concept in cfg.concepts:
        src = Path(concept.path).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConfigError("captioner.out_dir", cfg.captioner.out_dir,
                              f"overlaps the image folder of concept '{concept.id}' ({src}), which sd3exp never writes to",
                              "leave it at its default (<run>/captions) or choose a folder outside your datasets")


def _user_tags(concept: ConceptConfig, caption: Path) -> Tuple[bool, List[str]]:
    if not caption.is_file():
        return False, []
    text = caption.read_bytes().decode("utf-8", "replace")
    return True, tag_shuffle.split_tags(text, tag_shuffle.tag_separator(concept))


def plan_tasks(cfg: ExperimentConfig, backend: Backend, summary: Summary) -> List[Task]:
    """The images to send; the others are counted as kept or reused (a changed post-processing
    setting is applied to the stored raw answer here)."""
    c, template, tasks, seen = cfg.captioner, compile_prompt(cfg.captioner.prompt), [], set()
    for concept in cfg.concepts:
        store, post = Store(Path(c.out_dir), concept.id), post_settings(concept, c)
        for image in list_images(Path(concept.path)):
            has_user, tags = _user_tags(concept, image.with_suffix(".txt"))
            if has_user and c.only_missing:
                summary.kept += 1
                continue
            sha = file_sha256(image)
            request = {**backend.base, "prompt": render(template, concept.trigger, concept.id, tags, image.name)}
            record = store.get(sha)
            if record is not None and record.request_key == request_key(request):
                if record.post != asdict(post):
                    record.caption, record.post = postprocess(record.raw, post), asdict(post)
                    store.put(record)
                summary.reused += 1
            elif (concept.id, sha) in seen:  # identical bytes: one request serves both
                summary.reused += 1
            else:
                seen.add((concept.id, sha))
                tasks.append(Task(concept, image, sha, request["prompt"], request, post))
    return tasks


def caption_one(backend: Backend, task: Task, root: Path) -> Optional[int]:
    """Ask, post-process and store one caption; its token count."""
    try:
        answer = backend.ask(task)
    except OSError as e:  # the image vanished or cannot be read
        raise ImageFailed("unreadable image", f"{type(e).__name__}: {e}", "check the file, or remove it") from None
    record = Record(task.image.name, task.sha256, postprocess(answer.text, task.post), answer.text, task.request,
                    request_key(task.request), asdict(task.post), answer.tokens)
    Store(root, task.concept.id).put(record)
    return answer.tokens


def run_tasks(backend: Backend, tasks: List[Task], workers: int, summary: Summary, progress: bool) -> None:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption")
    bar = console.progress(total=len(tasks), desc="caption", unit="image", disable=not progress or not tasks)
    try:
        futures = {pool.submit(caption_one, backend, t, summary.out_dir): t for t in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                tokens = future.result()
                summary.captioned += 1
                if tokens is not None:
                    summary.tokens = (summary.tokens or 0) + tokens
            except ImageFailed as e:
                summary.failures.append(Failure(task.concept.id, task.image, e))
            bar.update()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()


def caption(cfg: ExperimentConfig, again: str, progress: bool = True,
            echo: Callable[[str], None] = print) -> Summary:
    """Run the stage; CaptionError naming the count when some images failed. `again`: the command to re-run."""
    check_out_dir(cfg)
    summary = Summary(Path(cfg.captioner.out_dir))
    backend = backend_for(cfg.captioner)
    tasks = plan_tasks(cfg, backend, summary)
    with sigterm_raises(Stopped):
        try:
            run_tasks(backend, tasks, cfg.captioner.workers, summary, progress)
        except KeyboardInterrupt as exc:
            echo(summary.line())
            raise Interrupted(f"captioning stopped by {described(signum_of(exc))}: the {summary.captioned} "
                              f"caption(s) received are stored in {summary.out_dir}. Continue with: {again}",
                              signum_of(exc)) from None
    for failure in sorted(summary.failures, key=lambda f: (f.concept, f.image.name)):
        echo(f"  FAILED {failure.line()}")
    echo(summary.line())
    if summary.failures:
        total = len(tasks)
        raise CaptionError(f"{len(summary.failures)} of {total} image(s) sent got no caption (listed above). "
                           f"Fix: follow each image's fix, then run `{again}`: only the images still without a "
                           "caption are sent again")
    return summary
