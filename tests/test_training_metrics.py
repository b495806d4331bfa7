"""fastdit.training.metrics: metrics.jsonl trimmed at a resume, and TensorBoard that shows each step once."""
import json

import pytest

from fastdit.training import metrics


def _tb_steps(log_dir):
    """{tag: [steps]} as TensorBoard shows them (its EventAccumulator, which applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(writer, steps, every_other=()):
    for s in steps:
        writer.add_scalar("train/loss", 1.0 / s, s)
        if s in every_other:
            writer.add_scalar("eval/fid", 10.0 + s, s)
    writer.flush()


def test_tensorboard_after_resume_shows_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    # the first run logs steps 1-10 (a checkpoint at 6), an eval at step 8, and is killed
    w = metrics.tensorboard_writer(str(tb), 0)
    _log(w, range(1, 11), every_other={4, 8})
    w.close()
    # resumed from step 6: logs 7-9, no eval yet, and is killed again
    w = metrics.tensorboard_writer(str(tb), 6)
    _log(w, range(7, 10))
    w.close()
    shown = _tb_steps(tb)
    assert shown["train/loss"] == list(range(1, 10))
    assert shown["eval/fid"] == [4]  # step 8's eval belonged to the lost stretch
    # a fresh start over a leftover tb/ (no checkpoint was ever written) drops everything
    w = metrics.tensorboard_writer(str(tb), 0)
    _log(w, [1, 2])
    w.close()
    shown = _tb_steps(tb)
    assert shown["train/loss"] == [1, 2] and shown.get("eval/fid", []) == []


def test_trim_keeps_steps_up_to_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 9, "lo')
    metrics.trim(str(path), 4)
    assert [r["step"] for r in metrics.read_metrics(str(path))] == [1, 2, 3, 4]
