"""bench.imagenette's arithmetic and formatting on hand-built per-epoch rows, the service's per-epoch training
seconds read from a hand-built metrics.jsonl, the plain loop's flags from a resolved config, and --root as a tar or a
folder. Nothing here trains."""
import json
import tarfile
from pathlib import Path

import pytest

from bench import imagenette, imagenette_ablation
from bench.time_to_accuracy import per_epoch
from common.errors import DataError, UserInputError
from trainer.config import load_config


def run(seed, curve, img_per_s=20.0, cpu_s=600.0):
    """A run as bench.imagenette records it: curve is [(top1, cumulative train s)] after each epoch."""
    epochs = [{"epoch": i + 1, "top1": top1, "train_s": train_s} for i, (top1, train_s) in enumerate(curve)]
    return {"seed": seed, "epochs": epochs, "val_top1": curve[-1][0], "img_per_s": img_per_s, "cpu_s": cpu_s,
            "wall_s": 1.0}


SERVICE = [run(0, [(60, 100), (81, 200), (88, 300)], 20, 700), run(1, [(55, 110), (79, 220), (86, 330)], 18, 800)]
PLAIN = [run(0, [(50, 150), (70, 300), (82, 450)], 15, 900), run(1, [(48, 160), (72, 320), (80, 480)], 13, 1000)]


def test_summary_of_runs_mean_spread_speed_and_time_to_80():
    s = imagenette.summarize(SERVICE)
    assert (s["runs"], s["top1_mean"], s["top1_min"], s["top1_max"]) == (2, 87.0, 86, 88)
    assert s["top1_std"] == pytest.approx(2 ** 0.5)  # the sample standard deviation of 88 and 86
    assert (s["img_per_s"], s["cpu_s"], s["train_s"]) == (19.0, 750.0, 315.0)
    assert s["to_target_s"] == [200, 330]  # the first epoch at or past 80%: epoch 2 of seed 0, epoch 3 of seed 1
    assert imagenette.summarize(SERVICE[:1])["top1_std"] is None


def test_time_to_a_target_counts_the_runs_that_never_reached_it():
    assert imagenette.time_to([200, 330]) == "265 s"
    assert imagenette.time_to([200, None]) == "200 s (1 of 2 runs)"
    assert imagenette.time_to([None, None]) == "not reached"


def test_service_to_plain_is_the_time_to_the_plain_mean_over_the_plain_train_time():
    plain = imagenette.summarize(PLAIN)
    assert (plain["top1_mean"], plain["train_s"]) == (81.0, 465.0)
    versus = imagenette.service_to_plain(SERVICE, plain)
    # Seed 0 reaches 81.0 exactly at epoch 2 (200 s), seed 1 only at epoch 3 (330 s).
    assert versus["train_s"] == [200, 330]
    assert versus["ratio"] == pytest.approx(265 / 465)
    slow = [run(0, [(60, 100), (70, 200), (80.9, 300)])]
    assert imagenette.service_to_plain(slow, plain)["ratio"] is None


def test_report_names_the_target_met_or_not():
    lines = "\n".join(imagenette.figures({"service": SERVICE, "plain": PLAIN}))
    assert "| service (2 runs) | 87.00% | 86.00-88.00 | 1.41 | 19.0 | 750 | 315 | 265 s |" in lines
    assert "| plain (2 runs) | 81.00% | 80.00-82.00 | 1.41 | 14.0 | 950 | 465 | 465 s |" in lines
    assert "service - plain: +6.00 points mean final val top-1, 1.36x train img/s, 1.27x less CPU" in lines
    assert "reaches the plain loop's mean final 81.00% in 265 s of training, 0.57x the plain loop's 465 s" in lines
    assert "target (<= 0.8x) met" in lines
    late = [run(0, [(60, 100), (70, 200), (81, 400)]), run(1, [(60, 100), (70, 200), (85, 380)])]
    lines = "\n".join(imagenette.figures({"service": late, "plain": PLAIN}))
    assert "0.84x the plain loop's 465 s: target (<= 0.8x) NOT met" in lines
    never = [run(0, [(60, 100), (70, 200), (75, 300)]), *SERVICE[:1]]
    lines = "\n".join(imagenette.figures({"service": never, "plain": PLAIN}))
    assert "not in every run (200 s (1 of 2 runs)): target (<= 0.8x) NOT met" in lines
    assert "| service (2 runs) | 81.50% |" in lines and "| 200 s (1 of 2 runs) |" in lines


def test_the_service_alone_has_its_table_and_no_comparison():
    lines = imagenette.figures({"service": SERVICE})
    assert len(lines) == 3 and lines[2].startswith("| service (2 runs) |")


def test_markdown_has_the_command_machine_date_table_and_curves():
    meta = {"command": "python -m bench.imagenette --root X --runs 2", "epochs": 3, "runs": 2, "nproc": 2,
            "machine": {"model": "AMD EPYC 9R14", "cores": 2, "avx512": True, "avx512_bf16": False,
                        "load_average": 2.5},
            "started": "2026-12-08 01:00 UTC", "finished": "2026-12-08 03:00 UTC",
            "service_command": "torchrun ... trainer.main", "plain_command": "torchrun ... bench.plain_imagenette"}
    text = imagenette.markdown({"service": SERVICE, "plain": PLAIN}, meta)
    assert "```bash\npython -m bench.imagenette --root X --runs 2\n```" in text
    assert "AMD EPYC 9R14, 2 logical cores, AVX-512 yes (bf16 no); load average 2.50 at the start" in text
    assert "2026-12-08 01:00 UTC - 2026-12-08 03:00 UTC" in text
    assert "| service (2 runs) | 87.00% |" in text and "target (<= 0.8x) met" in text
    assert "| run | seed | epoch 1 | epoch 2 | epoch 3 |" in text
    assert "| plain | 1 | 48.0% (160 s) | 72.0% (320 s) | 80.0% (480 s) |" in text


def test_cpu_facts_read_the_model_name_and_avx512_flags():
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu sse avx512f avx512bw\n"
    assert imagenette.cpu_facts(cpuinfo) == {"model": "AMD EPYC 9R14 96-Core Processor", "avx512": True,
                                             "avx512_bf16": False}
    assert imagenette.cpu_facts("model name: X\nflags: avx2 avx512_bf16 avx512f\n")["avx512_bf16"]
    assert not imagenette.cpu_facts("model name: X\nflags: avx2 fma\n")["avx512"]


def test_plain_rows_are_the_epoch_lines_and_the_last_line_is_the_run():
    log = "\n".join(["W1208 torchrun noise", json.dumps({"epoch": 1, "val_top1": 40.0, "train_s": 10.0}),
                     "some warning", json.dumps({"epoch": 2, "val_top1": 55.5, "train_s": 21.0}),
                     json.dumps({"val_top1": 55.5, "val_images": 300, "train_s": 21.0, "img_per_s": 30.0})])
    rows, final = imagenette.plain_rows(log)
    assert rows == [{"epoch": 1, "top1": 40.0, "train_s": 10.0}, {"epoch": 2, "top1": 55.5, "train_s": 21.0}]
    assert final["val_images"] == 300


def test_per_epoch_counts_the_steps_after_an_epochs_last_train_record(tmp_path):
    # 10 steps an epoch, logged every 4: steps 9-10 and 19-20 have no train record before the val pass.
    records = [("train", 4, 0.4, 1.0), ("train", 8, 0.8, 1.0), ("val", 10, 1.0, None),
               ("train", 12, 1.2, 2.0), ("train", 16, 1.6, 2.0), ("val", 20, 2.0, None)]
    with open(tmp_path / "metrics.jsonl", "w") as out:
        for split, step, epoch, step_time in records:
            fields = {"step_time_s": step_time} if split == "train" else {"top1": 10.0 * step}
            out.write(json.dumps({"split": split, "step": step, "epoch": epoch, **fields}) + "\n")
    # Epoch 1: 10 steps of 1 s. Epoch 2: 10 more of 2 s (steps 11-12 at the first record's time).
    assert per_epoch(tmp_path) == [{"epoch": 1.0, "top1": 100.0, "train_s": 10.0},
                                   {"epoch": 2.0, "top1": 200.0, "train_s": 30.0}]


def test_plain_flags_take_the_services_net_crops_batch_and_precision():
    cfg = load_config(None, ["model.name=resnet18", "model.deep_stem=true", "model.shortcut=D",
                             "model.zero_init_residual=true", "data.image_size=128", "data.val_resize=146",
                             "train.batch_size=16", "train.grad_accum=2", "train.precision=bf16"])
    assert imagenette.plain_flags(cfg, None, None) == [
        "--arch", "resnet18", "--deep-stem", "--shortcut", "D", "--zero-init-residual", "--size", "128",
        "--val-size", "128", "--val-resize", "146", "--batch-size", "32", "--precision", "bf16"]
    cfg = load_config(None, ["data.image_size=128", "data.val_image_size=160", "data.val_resize=182",
                             "train.precision=fp32"])
    flags = imagenette.plain_flags(cfg, "resnet34", 0.4)  # another net: torchvision's, without the options
    assert flags[:2] == ["--arch", "resnet34"] and flags[4:6] == ["--val-size", "160"]
    assert flags[-4:] == ["--precision", "fp32", "--lr", "0.4"]


def test_plain_flags_refuse_what_the_plain_loop_cannot_train():
    with pytest.raises(UserInputError, match="model.name=resnet20 has none of them"):
        imagenette.plain_flags(load_config(None, ["model.name=resnet20"]), None, None)
    assert imagenette.plain_flags(load_config(None, ["model.name=resnet20"]), "resnet18", None)[1] == "resnet18"
    with pytest.raises(UserInputError, match="not train.precision=fp16"):
        imagenette.plain_flags(load_config(None, ["train.precision=fp16"]), None, None)


def _layout(root):
    for split in ("train", "val"):
        (root / "imagenette" / split / "n01440764").mkdir(parents=True)
        (root / "imagenette" / split / "n01440764" / "a.JPEG").write_bytes(b"jpeg")
    return root


def test_root_is_a_folder_or_an_archive_extracted_to_scratch(tmp_path):
    folder = _layout(tmp_path / "folder")
    assert imagenette.dataset_root(folder, tmp_path / "unused") == folder / "imagenette"
    assert not (tmp_path / "unused").exists()
    with tarfile.open(tmp_path / "imagenette.tar", "w") as archive:
        archive.add(folder / "imagenette", arcname="imagenette")
    extracted = imagenette.dataset_root(tmp_path / "imagenette.tar", tmp_path / "scratch")
    assert extracted == tmp_path / "scratch" / "imagenette"
    assert (extracted / "val" / "n01440764" / "a.JPEG").read_bytes() == b"jpeg"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="^--root: .* holds no folder with train/ and val/"):
        imagenette.dataset_root(tmp_path / "empty", tmp_path / "scratch2")


def test_the_command_refuses_before_training(tmp_path, capsys):
    root = _layout(tmp_path / "data")
    args = ["--root", str(root), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.md")]
    assert imagenette.main([*args[:2], "--root", str(tmp_path / "nowhere")]) == 1
    assert "error: --root: " in capsys.readouterr().err
    assert imagenette.main([*args, "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config error: --config: no such file" in capsys.readouterr().err
    assert imagenette.main([*args, "--config", "configs/resnet_cifar10_cpu.yaml"]) == 2
    assert "model.name=resnet20 has none of them" in capsys.readouterr().err
    assert imagenette.main([*args, "--config", "configs/resnet_cifar10_cpu.yaml", "--", "optim.nope=1"]) == 2
    assert "config error: optim.nope" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.md").exists()
    (tmp_path / "work" / "seed0").mkdir(parents=True)
    with pytest.raises(SystemExit):
        imagenette.main(args)
    assert "already holds runs" in capsys.readouterr().err


@pytest.mark.parametrize("variant", imagenette_ablation.VARIANT_NAMES)
def test_every_ablation_variant_is_a_valid_config_of_the_preset(variant):
    overrides = [*imagenette_ablation.proxy_overrides("resnet18", 64), *imagenette_ablation.variants(64)[variant][1]]
    cfg = load_config(Path(imagenette_ablation.PRESET), ["data.root=/tmp", *overrides])
    assert (cfg.model.name, cfg.data.image_size, cfg.data.val_resize) == ("resnet18", 64, 73)


def test_ablation_report_gives_each_variant_against_the_preset():
    rows = [{"epoch": 1.0, "top1": 40.0, "train_s": 10.0}, {"epoch": 2.0, "top1": 60.0, "train_s": 20.0}]
    results = {"preset": {"epochs": rows, "final": 60.0, "ema": 61.5},
               "blurpool": {"epochs": rows[:1] + [{**rows[1], "top1": 58.5}], "final": 58.5, "ema": None}}
    lines = imagenette_ablation.report(results, "header").splitlines()
    assert lines[0] == "header"
    assert lines[2].split()[:5] == ["preset", "40.0", "60.0", "60.0", "61.5"]
    assert lines[3].split()[:6] == ["blurpool", "40.0", "58.5", "58.5", "-", "-1.5"]


def test_ablation_refuses_a_root_without_the_imagenet_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert imagenette_ablation.main(["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "holds no folder with train/ and val/" in capsys.readouterr().err
