import json

from sslscale import checkpoint


def fake_checkpoint(run_dir, step, complete=True):
    folder = checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x" * 10)
    if complete:
        marker = {"tag": folder.name, "step": step, "files": {"model.pt": 10}, "world_size": 2, "zero_stage": 1}
        (folder / checkpoint.MARKER).write_text(json.dumps(marker))
    return folder


def steps(run_dir):
    return [checkpoint.step_of(p) for p in checkpoint.step_folders(run_dir)]


def test_retention_keeps_last_and_every_and_never_the_newest(tmp_path):
    for s in range(100, 1100, 100):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 250, complete=False)  # leftover of an interrupted save
    fake_checkpoint(tmp_path, 1100, complete=False)  # newer than the newest complete: left alone
    checkpoint.retain(tmp_path, keep_last=2, keep_every=500)
    assert steps(tmp_path) == [1100, 1000, 900, 500]
    checkpoint.retain(tmp_path, keep_last=0)
    assert steps(tmp_path) == [1100, 1000, 900, 500]


def test_truncated_file_makes_a_checkpoint_incomplete(tmp_path):
    old, new = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    assert checkpoint.find_latest(tmp_path) == new
    (new / "model.pt").write_bytes(b"x" * 3)
    assert checkpoint.find_latest(tmp_path) == old
    rows = checkpoint.describe(tmp_path)
    assert [(r["step"], r["complete"], r["world_size"]) for r in rows] == [(2, False, None), (1, True, 2)]
