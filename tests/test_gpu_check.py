"""benchmarks/gpu_check.py --scale tiny: the full-size check's code path, on the CPU (issue 19)."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import ROOT, needs_trainer, trainer_python


@needs_trainer
def test_gpu_check_tiny_runs_both_compiled_runs(tmp_path):
    out = subprocess.run([str(trainer_python()), str(ROOT / "benchmarks" / "gpu_check.py"), "--scale", "tiny",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["run"] for r in results] == ["fantasy_art", "fantasy_art_lora"]
    for r in results:
        assert r["device"] == "cpu" and r["train"]["s_per_step"] > 0 and r["eval"]["cells"] == 4
        assert r["estimate_gib"]["total"] > 0
    assert "AdamWBF16" in results[0]["train"]["optimizer_used"]
    assert "estimate" in out.stdout and "s/step" in out.stdout and "s/cell" in out.stdout
