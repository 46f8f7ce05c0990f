"""W&B offline: grouped metrics, the run id survives a restart, and the API key is never written anywhere."""
import pytest
import torch

from tests.helpers import TINY, run_trainer, trainer_env

pytestmark = pytest.mark.slow  # every test here trains in real processes

SECRET = "local-0123456789abcdef0123456789abcdef01234567"


def test_wandb_offline_resumes_same_run_and_never_writes_the_key(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = trainer_env(WANDB_API_KEY=SECRET)
    args = [*TINY, "train.batch_size=8", "monitor.wandb=true", "monitor.group=an-experiment", f"data.root={tiny_data}",
            f"run.dir={run_dir}"]
    first = run_trainer(1, *args, "train.max_steps=6", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = torch.load(run_dir / "checkpoints" / "ckpt-000000006.pt", weights_only=True)["wandb_id"]
    assert run_id
    second = run_trainer(1, *args, "train.max_steps=8", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "ckpt-000000008.pt", weights_only=True)["wandb_id"] == run_id
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)

    # The offline run is a protobuf log; the grouped metric names and the run's group must be in it.
    log = (run_dir / "wandb" / offline_runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"an-experiment" in log
    for key in ("train/loss", "train/top1", "train/lr", "perf/img_per_s", "perf/data_wait", "sys/max_mem_mb",
                "val/top1", "val/top5", "trainer/step", "trainer/images_seen"):
        assert key.encode() in log, key
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in first.stdout + first.stderr + second.stdout + second.stderr
