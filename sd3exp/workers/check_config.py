"""Pre-flight, run by the trainer's Python in a compiled run folder: parse the
config exactly as `simpletuner train` would and print the result as JSON.

Standalone on purpose (stdlib + SimpleTuner only): sd3exp's own venv never
imports SimpleTuner.
"""

import contextlib
import io
import json
import os
import sys

MARKER = "SD3EXP-PREFLIGHT "


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _checkpoint_guard():
    """The file SimpleTuner writes last into a finished checkpoint, if this version writes one."""
    try:
        from simpletuner.helpers.utils import checkpoint_manager
    except ImportError:
        return None
    return getattr(checkpoint_manager, "CHECKPOINT_GUARD_FILENAME", None)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            from simpletuner.helpers.configuration import loader

            args = loader.load_config(exit_on_error=True)
        result = {"ok": True, "args": {k: _plain(v) for k, v in sorted(vars(args).items())}}
    except SystemExit:
        result = {"ok": False, "error": buf.getvalue()[-3000:]}
    except Exception as exc:  # SimpleTuner raises ValueError and friends for bad values
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    import torch

    result["cuda"] = bool(torch.cuda.is_available())
    result["checkpoint_guard"] = _checkpoint_guard()
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
