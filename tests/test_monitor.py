"""W&B offline, read back from the run's own files: grouping, summaries, pictures, alerts, the run id surviving a
restart, no step logged twice after a resume, and the API key never written anywhere."""
import json
import struct

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from tests.helpers import TINY, run_trainer, trainer_env

pytestmark = pytest.mark.slow  # every test here trains in real processes

SECRET = "local-0123456789abcdef0123456789abcdef01234567"
BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of protobuf records after a 7-byte header


def wandb_records(path) -> list:
    """The records of an offline run's .wandb file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind not in (1, 2, 3, 4):  # full, first, middle, last
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records) -> list:
    """Each logged row as {key: value}, nested keys joined with '/'."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """A run to step 6 whose latest checkpoint is set back to step 5, as if it had died after logging step 6, then
    resumed to step 8; both jobs write an offline W&B run with the same id."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    env = {k: v for k, v in trainer_env(WANDB_API_KEY=SECRET).items() if not k.startswith("SLURM_")}
    args = [*TINY, "train.batch_size=8", "monitor.wandb=true", "monitor.tags=[smoke,tiny]", f"data.root={tiny_data}",
            f"run.dir={run_dir}"]
    first = run_trainer(1, *args, "train.max_steps=6", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "ckpt-000000006.pt").unlink()
    (checkpoints / "latest").write_text("ckpt-000000005.pt\n")
    second = run_trainer(1, *args, "train.max_steps=8", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, first.stdout + first.stderr + second.stdout + second.stderr


def offline_runs(run_dir) -> list:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_the_same_run_continues_and_the_key_is_never_written(resumed_run):
    run_dir, output = resumed_run
    run_id = torch.load(run_dir / "checkpoints" / "ckpt-000000008.pt", weights_only=True)["wandb_id"]
    assert run_id
    assert len(offline_runs(run_dir)) == 2 and all(p.name.endswith(run_id) for p in offline_runs(run_dir))
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in output


def test_group_job_type_tags_epoch_and_the_max_summary(resumed_run):
    run_dir, _ = resumed_run
    records = wandb_records(next(offline_runs(run_dir)[0].glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, list(run.tags)) == ("run", "train", ["smoke", "tiny"])
    summaries = {r.metric.name: r.metric.summary for r in records if r.WhichOneof("record_type") == "metric"}
    assert summaries["val/top1"].max and summaries["val/top5"].max
    rows = history(records)
    train = [r for r in rows if "train/loss" in r]
    assert [r["trainer/epoch"] for r in train] == pytest.approx([s / 12 for s in range(1, 7)])
    for key in ("train/top1", "train/lr", "perf/img_per_s", "perf/img_per_s_per_device", "perf/data_wait",
                "perf/data_wait_max", "sys/max_mem_mb", "sys/max_mem_allocated_mb", "trainer/images_seen"):
        assert key in train[0], key
    assert any("val/top1" in r for r in rows)


def test_a_train_and_a_val_grid_are_logged_at_the_start(resumed_run):
    run_dir, _ = resumed_run
    first = offline_runs(run_dir)[0]
    rows = history(wandb_records(next(first.glob("run-*.wandb"))))
    grids = {split: next(r for r in rows if f"images/{split}/path" in r) for split in ("train", "val")}
    assert all(row["trainer/step"] == 0 and row[f"images/{split}/_type"] == "image-file"
               for split, row in grids.items())
    files = [(first / "files" / row[f"images/{split}/path"]).read_bytes() for split, row in grids.items()]
    assert files[0] != files[1]  # augmented train images and centre-cropped val images differ
    # The resumed job does not log them again.
    assert not any("images/train/path" in r for r in history(wandb_records(next(offline_runs(run_dir)[1].glob(
        "run-*.wandb")))))


def test_no_step_is_logged_twice_after_a_resume_and_each_job_ends_with_an_alert(resumed_run):
    run_dir, _ = resumed_run
    steps, alerts = [], []
    for run in offline_runs(run_dir):
        records = wandb_records(next(run.glob("run-*.wandb")))
        steps += [r["trainer/step"] for r in history(records) if "train/loss" in r]
        alerts += [r.alert.title for r in records if r.WhichOneof("record_type") == "alert"]
    # Step 6 came after the checkpoint the second job resumed from: metrics.jsonl repeats it, W&B must not.
    assert steps == list(range(1, 9))
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] == list(range(1, 9))
    assert alerts == ["finished", "finished"]
