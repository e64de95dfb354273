"""Which cells of an earlier evaluation are reused (sd3exp.evaluate.reuse)."""

from __future__ import annotations

from pathlib import Path

from sd3exp.evaluate.cells import Cell
from sd3exp.evaluate.reuse import adopt, reusable, wanted

PROMPTS = ["k4s4, a castle", "k4s4, a dragon"]


def earlier(tmp_path: Path) -> tuple[list[Cell], dict]:
    """checkpoint-2 and -4 x two prompts, seed 0; checkpoint-4's dragon failed."""
    cells = []
    for label in ("checkpoint-2", "checkpoint-4"):
        for i, prompt in enumerate(PROMPTS):
            image = tmp_path / f"{label}_p{i}_s0.png"
            image.write_bytes(f"{label} {i}".encode())
            failed = label == "checkpoint-4" and i == 1
            cells.append(Cell(label, int(label[-1]), i, prompt, 0, "error" if failed else "ok",
                              paths=[] if failed else [image]))
    record = {"settings": "s1", "checkpoints": {"checkpoint-2": ["/t/2", 1], "checkpoint-4": ["/t/4", 1]}}
    return cells, record


def test_unchanged_cells_are_reused_under_their_new_prompt_index(tmp_path):
    cells, record = earlier(tmp_path)
    prompts = ["k4s4, a tower", PROMPTS[1], PROMPTS[0]]
    found = reusable(cells, record, record, prompts, [0, 1])
    assert sorted(found) == [("checkpoint-2", 1, 0, ""), ("checkpoint-2", 2, 0, ""), ("checkpoint-4", 2, 0, "")]
    assert found[("checkpoint-2", 2, 0, "")].prompt == PROMPTS[0] and found[("checkpoint-2", 2, 0, "")].prompt_index == 2


def test_changed_settings_or_checkpoints_or_lost_images_are_rendered_again(tmp_path):
    cells, record = earlier(tmp_path)
    assert reusable(cells, record, {**record, "settings": "s2"}, PROMPTS, [0]) == {}
    retrained = {**record, "checkpoints": {**record["checkpoints"], "checkpoint-2": ["/t/2", 2]}}
    assert sorted(reusable(cells, record, retrained, PROMPTS, [0])) == [("checkpoint-4", 0, 0, "")]
    (tmp_path / "checkpoint-4_p0_s0.png").unlink()
    assert sorted(reusable(cells, record, retrained, PROMPTS, [0])) == []


def test_adopted_images_get_the_new_names_and_keep_their_bytes(tmp_path):
    (tmp_path / "old").mkdir()
    cells, record = earlier(tmp_path / "old")
    found = reusable(cells, record, record, list(reversed(PROMPTS)), [0])
    placed = adopt(found, tmp_path / "new")
    assert placed[("checkpoint-2", 1, 0, "")].paths == [tmp_path / "new" / "checkpoint-2_p1_s0.png"]
    assert (tmp_path / "new" / "checkpoint-2_p1_s0.png").read_bytes() == b"checkpoint-2 0"
    assert len(wanted(["a", "b"], PROMPTS, [0, 1, 2])) == 12
