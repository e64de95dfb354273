"""The scale a LoRA checkpoint is rendered at (sd3exp.evaluate.lora_scale), from SimpleTuner-like files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sd3exp.errors import EvalError
from sd3exp.evaluate.checkpoints import Checkpoint
from sd3exp.evaluate.lora_scale import inspect, strengths
from tests.comfy_standin import save_safetensors
from tests.test_eval_cli import lora_tensors, simpletuner_metadata

ALPHA_KEY = "transformer.transformer_blocks.0.attn.to_q.alpha"


def lora(path: Path, step, **kwargs) -> Checkpoint:
    save_safetensors(path, kwargs.pop("tensors", lora_tensors(1)), kwargs.pop("metadata", None))
    return Checkpoint(step, f"checkpoint-{step}" if step else "final", "lora", path)


def test_the_final_model_takes_the_scale_its_checkpoints_record(tmp_path):
    found, warnings = strengths([lora(tmp_path / "a", 2, metadata=simpletuner_metadata(4, 8)), lora(tmp_path / "b", None)],
                                rank=4, alpha=8)
    assert {k: (s.trained, s.comfy_strength) for k, s in found.items()} == {"checkpoint-2": (2.0, 2.0),
                                                                            "final": (2.0, 2.0)}
    assert found["final"].source == "the run's other checkpoints" and warnings == []


def test_alpha_tensors_are_applied_by_comfyui_already(tmp_path):
    tensors = {**lora_tensors(1), ALPHA_KEY: ([], struct.pack("<f", 8.0))}
    assert inspect(lora(tmp_path / "a", 2, tensors=tensors).path).tensor_scale == 2.0
    found, _ = strengths([lora(tmp_path / "a", 2, tensors=tensors)], rank=4, alpha=8)
    assert (found["checkpoint-2"].trained, found["checkpoint-2"].comfy_strength) == (2.0, 1.0)


def test_metadata_that_disagrees_with_the_experiment_wins_and_is_reported(tmp_path):
    found, warnings = strengths([lora(tmp_path / "a", 2, metadata=simpletuner_metadata(4, 16))], rank=4, alpha=4)
    assert found["checkpoint-2"].trained == 4.0 and "rendering at 4" in warnings[0]


def test_without_any_record_the_experiments_alpha_over_rank_is_used(tmp_path):
    found, _ = strengths([lora(tmp_path / "a", None)], rank=16, alpha=8)
    assert (found["final"].trained, found["final"].source) == (0.5, "lora.alpha/lora.rank")


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"half")
    with pytest.raises(EvalError, match="not a readable safetensors file"):
        inspect(tmp_path / "bad")
