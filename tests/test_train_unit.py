"""The runner: its parsing of SimpleTuner's output, its summary, and unfinished checkpoints."""

from __future__ import annotations

import io
from pathlib import Path

from tqdm import tqdm

from sd3exp.layout import RunLayout
from sd3exp.runfolder import checkpoint_dirs, set_aside_unfinished
from sd3exp.train import Progress, TrainResult, follow, report, status_text

# Lines as SimpleTuner 4.10.1 prints them (tqdm, \r-separated, wrapped in colour resets).
FIRST = "\x1b[0mEpoch 1/1 Steps:   0%|          | 0/4 [00:00<?, ?it/s]"
LATER = "Epoch 1/1, Steps:  50%|█████     | 2/4 [00:04<00:03,  1.84s/it, lr=0.0001, step_loss=4.12]\x1b[0m"
RESUMED = "Epoch 1/1, Steps:  80%|████████  | 4/5 [00:00<?, ?it/s]"

UNFINISHED = RunLayout.UNFINISHED


def test_tqdm_lines_move_the_step_counter_and_carry_loss_and_lr():
    p = Progress()
    assert p.feed(FIRST) is False and p.total == 4
    assert p.feed(LATER) is True
    assert (p.step, p.total, p.loss, p.lr) == (2, 4, 4.12, 0.0001)
    assert p.feed("[RANK 0] 2026-11-25 14:05:56,046 [INFO] Saving checkpoint") is False
    assert p.tail[-1].endswith("Saving checkpoint")


def test_only_the_final_save_counts_as_the_final_weights_saved():
    """Lines of SimpleTuner 4.10.1's train.log: a checkpoint's save, then the final LoRA's (a full
    fine-tune's final save says 'Wrote pipeline to disk')."""
    p = Progress()
    p.feed("\x1b[0m\x1b[0mModel weights saved in training/checkpoint-6-tmp/pytorch_lora_weights.safetensors")
    assert not p.saved_final
    p.feed("\x1b[0mEpoch 1/1, Steps: 100%|██████████| 6/6 [00:17<00:00,  1.25s/it, lr=0.0001, step_loss=2.32]"
           "\x1b[0mModel weights saved in training/pytorch_lora_weights.safetensors")
    assert p.saved_final and p.step == 6
    full = Progress()
    full.feed("[RANK 0] 2026-12-06 00:16:17,000 [INFO] Wrote pipeline to disk: training/pipeline")
    assert full.saved_final


def test_a_resumed_bar_starts_at_its_checkpoint():
    p = Progress(step=0)
    p.feed(RESUMED)
    assert (p.step, p.total) == (4, 5)


def test_status_text_drops_log_prefixes_and_shortens():
    assert status_text("[RANK 0] 2026-11-25 14:05:56,046 [INFO] Loading VAE") == "Loading VAE"
    assert status_text("I1125 14:06:02.866000 30569 helpers/logging.py:12] caching") == "caching"
    assert len(status_text("x" * 200)) == 48


def test_summary_warns_when_the_trainer_disagrees_with_the_plan():
    p = Progress(step=24, total=24, loss=4.2)
    result = TrainResult(0, 30.0, 0, p, {2: "/r/training/checkpoint-2"}, "/r/train.log")
    text = report(result, [2, 4], 12, "next")
    assert "SimpleTuner planned 24 steps, plan.json 12" in text
    assert "warning" not in report(result, [2, 4], 24, "next")


def _checkpoint(training: Path, step: int, finished: bool) -> Path:
    path = training / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.bin").write_bytes(bytes([step]) * 16)
    if finished:
        (path / ".guard").write_text("complete\n")
    return path


def test_unfinished_checkpoints_are_moved_aside_not_deleted(tmp_path):
    training = tmp_path / "training"
    _checkpoint(training, 2, True)
    _checkpoint(training, 4, False)
    moved = set_aside_unfinished(training, ".guard")
    assert moved == [(training / "checkpoint-4", training / UNFINISHED / "checkpoint-4")]
    assert list(checkpoint_dirs(training)) == [2]
    assert (training / UNFINISHED / "checkpoint-4" / "optimizer.bin").read_bytes() == bytes([4]) * 16
    _checkpoint(training, 4, False)
    assert set_aside_unfinished(training, ".guard")[0][1] == training / UNFINISHED / "checkpoint-4.2"
    assert sorted(p.name for p in (training / UNFINISHED).iterdir()) == ["checkpoint-4", "checkpoint-4.2"]


def test_without_a_guard_convention_nothing_is_moved(tmp_path):
    training = tmp_path / "training"
    _checkpoint(training, 2, False)
    assert set_aside_unfinished(training, None) == []
    assert list(checkpoint_dirs(training)) == [2]


def test_the_bar_follows_the_trainer_and_shows_only_known_values():
    out = io.StringIO()
    stream = io.BufferedReader(io.BytesIO("\r".join([FIRST, RESUMED.replace("4/5", "1/4"), LATER]).encode()))
    log = io.BytesIO()
    with tqdm(total=4, file=out, mininterval=0) as bar:
        follow(stream, log, bar, Progress())
        assert (bar.n, bar.postfix) == (2, "loss=4.12, lr=0.0001")
    assert "None" not in out.getvalue() and log.getvalue().endswith(LATER.encode())


HEURISTIC = ("\x1b[0mI1201 12:00:59.781000 18873 helpers/logging.py:425] Registered template heuristic: "
             "MTIAMMTemplateConfigHeuristic for template_name=triton::mm, device_type=mtia, op_name=None\n")


def test_a_killed_trainer_shows_its_last_meaningful_lines(tmp_path):
    """Issue 9: the tail of a killed trainer was torch's INFO lines (as SimpleTuner 4.10.1 prints them on
    a CPU), colour codes and repeated progress bars."""
    import io

    from sd3exp.train import TrainResult, _lines, failure_message

    raw = ("\x1b[0mWARNING: cpu offload is slow\n" + HEURISTIC * 30
           + "\x1b[0m\rEpoch 8/12, Steps:  64%|██▎ | 61/96 [00:24<14:33, 24.97s/it]\x1b[0m\r"
           "Epoch 8/12, Steps:  65%|██▍ | 62/96 [00:25<06:07, 10.80s/it, lr=0.0001, step_loss=4.17]\x1b[0m\n"
           "\x1b[0m\n\x1b[0mModel weights saved in training/checkpoint-62-tmp/pytorch_lora_weights.safetensors\n"
           "\x1b[0m\n\x1b[0m\rLoading captions:   0%|     | 0/16 [00:00<?, ?it/s]\x1b[0m\x1b[A\x1b[0m\x1b[0m\n"
           "\x1b[0m\r          \x1b[0m\x1b[A\x1b[0m\rEpoch 8/12, Steps:  65%|██▍ | 62/96 [00:26<06:07, 10.80s/it, "
           "lr=0.0001, step_loss=4.12]\x1b[0m\n" + HEURISTIC * 30).encode()
    progress = Progress()
    for line in _lines(io.BytesIO(raw), io.BytesIO()):
        progress.feed(line)
    result = TrainResult(137, 1.0, 0, progress, {62: str(tmp_path / "checkpoint-62")}, str(tmp_path / "train.log"),
                         killed_by="SIGKILL")
    message = failure_message(result, "python -m sd3exp stage=train", tmp_path)
    shown = message.split("Last lines:\n", 1)[1].split("\nFull log:", 1)[0].splitlines()
    assert shown == ["  WARNING: cpu offload is slow",
                     "  Model weights saved in training/checkpoint-62-tmp/pytorch_lora_weights.safetensors",
                     "  Epoch 8/12, Steps:  65%|██▍ | 62/96 [00:26<06:07, 10.80s/it, lr=0.0001, step_loss=4.12]"]
    assert "Resume from checkpoint-62: python -m sd3exp stage=train" in message


def test_failed_trainer_message_shows_its_own_error_line(tmp_path):
    """Issue 18 item 5: SimpleTuner 4.10.1's real output for a bucket short of one batch (recorded on a
    CPU) ends in accelerate's CalledProcessError traceback; the message shows the trainer's ValueError."""
    from sd3exp.train import TrainResult, _lines, failure_message

    raw = (Path(__file__).parent / "fixtures" / "simpletuner-4.10.1-zero-batches.log").read_bytes()
    progress = Progress()
    for line in _lines(io.BytesIO(raw), io.BytesIO()):
        progress.feed(line)
    result = TrainResult(1, 97.0, 0, progress, {}, str(tmp_path / "train.log"))
    message = failure_message(result, "python -m sd3exp stage=train", tmp_path)
    own = message.split("SimpleTuner's error:\n", 1)[1].split("\nLast lines:", 1)[0].splitlines()
    assert own[0] == "  ValueError: Dataset configuration will produce zero usable batches."
    assert "    - Bucket 0.5: 1 samples × 1 (with repeats) = 1 samples" in own
    assert not any("TorchDynamo" in ln or "CalledProcessError" in ln for ln in own)
    assert "CalledProcessError" in message.split("Last lines:", 1)[1]  # the launcher's tail is still there
