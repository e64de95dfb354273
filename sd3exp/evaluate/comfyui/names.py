"""Model names (pure): what ComfyUI's /object_info says a loader accepts, and matching our checkpoints
to the server's spelling of them."""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

from sd3exp.errors import EvalError


def listed_names(object_info: Mapping[str, Any], class_type: str, input_name: str) -> list[str]:
    """Names from /object_info/<class_type>: list shape or ["COMBO", {"options": [...]}]."""
    try:
        spec = object_info[class_type]["input"]["required"][input_name]
    except (KeyError, TypeError) as exc:
        raise EvalError(f"ComfyUI has no {class_type} node with input {input_name}: too old, or node missing") from exc
    if isinstance(spec[0], list):
        return [str(n) for n in spec[0]]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return [str(n) for n in spec[1].get("options", [])]
    raise EvalError(f"unexpected /object_info/{class_type} shape for {input_name}: {str(spec)[:200]}")


def norm_name(name: str) -> str:
    """The name with forward slashes, as compared (a Windows server lists backslashes)."""
    return name.replace("\\", "/")


def closest(name: str, available: Sequence[str]) -> list[str]:
    """Available names, most similar to `name` first."""
    target = norm_name(name)
    return sorted(available, key=lambda n: (-difflib.SequenceMatcher(None, target, norm_name(n)).ratio(), n))


LINK_FIX = ("link the checkpoints into ComfyUI's models folder (eval.models_dir) or add the run folder with "
            "--extra-model-paths-config (eval.link_mode=extra_paths).")


def match_names(expected: Mapping[str, str], available: Sequence[str], class_type: str,
                fix: str = LINK_FIX) -> dict[str, str]:
    """label -> the server's spelling of its model name; EvalError listing what ComfyUI has, ending with `fix`."""
    by_norm = {norm_name(n): n for n in available}
    missing = {label: name for label, name in expected.items() if norm_name(name) not in by_norm}
    if missing:
        lines = [f"  {name!r} ({label}); closest: {closest(name, available)[:3]}" for label, name in missing.items()]
        shown = closest(next(iter(missing.values())), available)
        raise EvalError(
            f"ComfyUI's {class_type} cannot load {len(missing)} model(s):\n" + "\n".join(lines)
            + f"\nComfyUI lists {len(available)} name(s), closest first: {shown[:20]}"
            + ("" if len(shown) <= 20 else f" ... and {len(shown) - 20} more")
            + f"\nFix: {fix}"
        )
    return {label: by_norm[norm_name(name)] for label, name in expected.items()}

