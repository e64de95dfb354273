"""Pre-flight, run by the trainer's Python on compiled run folders: parse each
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


def parse(run_dir: str) -> dict:
    """SimpleTuner's parse of one run folder, with the process environment as it was before."""
    saved = dict(os.environ)
    buf = io.StringIO()
    try:
        os.chdir(run_dir)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            from simpletuner.helpers.configuration import loader

            args = loader.load_config(exit_on_error=True)
        return {"ok": True, "args": {k: _plain(v) for k, v in sorted(vars(args).items())}}
    except SystemExit:
        return {"ok": False, "error": buf.getvalue()[-3000:]}
    except Exception as exc:  # SimpleTuner raises ValueError and friends for bad values
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    """Parse each run folder named on the command line (default: the current one), one line each."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = [os.path.abspath(p) for p in sys.argv[1:]] or [os.getcwd()]
    import torch

    machine = {"cuda": bool(torch.cuda.is_available()), "checkpoint_guard": _checkpoint_guard()}
    for run in runs:
        sys.stdout.write(MARKER + json.dumps({**parse(run), **machine, "run": run}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
