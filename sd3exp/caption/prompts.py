"""The prompt sent with each image: a preset or the user's own Jinja template.

Variables: `trigger` (the concept's trigger word), `name` (the concept's id),
`tags` (the tags of the image's existing caption, a list, often empty) and `image`
(the file name). StrictUndefined: a misspelt variable is an error before any request.
"""

from __future__ import annotations

from typing import List

import jinja2

from sd3exp.errors import ConfigError

PRESETS = {
    # JoyCaption's "Descriptive" caption type, in its own wording
    "descriptive": (
        "Write a descriptive caption for this image in a formal tone, in one paragraph. "
        "Do not mention the image itself, its style or its medium unless it is notable. "
        "{% if tags %}These tags are known to apply: {{ tags | join(', ') }}. {% endif %}"
        "If the subject is {{ name }}, refer to it as {{ trigger }}."),
    # JoyCaption's "Booru tag list" caption type
    "booru": (
        "Write a list of Booru-like tags for this image, separated by commas, most important first. "
        "{% if tags %}Include these known tags: {{ tags | join(', ') }}. {% endif %}"
        "Do not write anything except the tags."),
}
VARIABLES = ("trigger", "name", "tags", "image")


def template_text(prompt: str) -> str:
    """The template of a preset name, or the value itself."""
    return PRESETS.get(prompt, prompt)


def compile_prompt(prompt: str) -> jinja2.Template:
    """The prompt template, checked by rendering it once with sample values."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
    fix = f"use a preset ({', '.join(PRESETS)}) or a template using only {', '.join(VARIABLES)}"
    try:
        template = env.from_string(template_text(prompt))
        render(template, "t", "n", ["a"], "x.png")
    except jinja2.TemplateError as e:
        raise ConfigError("captioner.prompt", prompt, f"the prompt template does not render: {e}", fix) from e
    return template


def render(template: jinja2.Template, trigger: str, name: str, tags: List[str], image: str) -> str:
    return template.render(trigger=trigger, name=name, tags=tags, image=image).strip()
