"""The service learns real ImageNet photos: a ResNet-18 with the Bag-of-Tricks stem and shortcut (ResNet-C and -D)
on an Imagenette subset, two processes under torchrun, bf16; and what a user runs first on a new dataset (data.verify,
the loaders' start-up screen) and finds in the run (classes.json with the wnids). Needs
../shared/datasets/imagenette-224.tar (CI has it); skipped elsewhere."""
import json

import pytest
from PIL import Image

from bench import loader as bench_loader
from data.image_files import GRAYSCALE, OK
from data.verify import main as verify_main
from data.verify import scan
from tests.helpers import extract_subset, run_trainer, shared_dataset
from trainer.plot import read_metrics

TRAIN_PER_CLASS, VAL_PER_CLASS = 150, 30
# The 10 classes in label order (../shared/datasets/README.md): tench ... parachute.
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888257"]
# 48 px, 5 epochs of 1,500 images at a global batch of 32 (230 steps): what fits the 90 s this test may add on 2
# cores (in bf16 this net steps about 1.8x as fast as in fp32 on an AVX-512-BF16 CPU). Of the few recipes tried
# here, one seed each: 64 px on 1,000 images, lr 0.1 at batch 32 with label smoothing: 32.3%; lr 0.2, zero-init
# residuals, no smoothing: 36.3%; the same at 48 px on 1,500 images: 47.0%, and 35.3% in 4 epochs (34.7% with crop
# area 0.6-1).
RECIPE = ["model.name=resnet18", "model.deep_stem=true", "model.shortcut=D", "model.zero_init_residual=true",
          "data.image_size=48", "data.val_resize=55", "data.crop_area=[0.35,1]", "data.num_threads=1",
          "train.batch_size=16", "train.epochs=5", "train.eval_every_epochs=5", "train.precision=bf16",
          "train.label_smoothing=0", "optim.lr=1.6", "optim.nesterov=true", "optim.weight_decay=5e-5",
          "schedule.warmup_epochs=1", "checkpoint.every_steps=0", "monitor.wandb=false", "monitor.progress=false"]


@pytest.fixture(scope="module")
def imagenette_subset(tmp_path_factory):
    """The first 150 train and 30 val images of each class (by name), extracted alone from the archive."""
    return extract_subset(shared_dataset("imagenette-224.tar"), tmp_path_factory.mktemp("imagenette_subset"),
                          {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS})


@pytest.fixture(scope="module")
def imagenette_run(imagenette_subset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imagenette_run") / "run"
    result = run_trainer(2, f"data.root={imagenette_subset}", f"run.dir={run_dir}", *RECIPE, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_resnet18_c_d_learns_real_imagenette_in_bf16(imagenette_run):
    val = [r for r in read_metrics(imagenette_run) if r["split"] == "val"]
    assert val[-1]["samples"] == 10 * VAL_PER_CLASS
    # Chance is 10%. Measured here: 47.0% (seed 0, the test's) and 51.7% (seed=1); the bound leaves room for other
    # CPUs' arithmetic and another data order.
    assert val[-1]["top1"] > 25, val


@pytest.mark.slow
def test_classes_json_holds_the_wnids_in_label_order(imagenette_run):
    assert json.loads((imagenette_run / "classes.json").read_text()) == WNIDS


@pytest.mark.slow  # the extraction
def test_verify_and_the_start_up_screen_pass_imagenette_with_its_grayscale_photos_named(imagenette_subset, capsys):
    checks = scan(imagenette_subset, workers=2)
    assert len(checks) == 10 * (TRAIN_PER_CLASS + VAL_PER_CLASS)
    gray = []
    for check in checks:
        with Image.open(imagenette_subset / check.path) as image:
            if image.mode == "L":
                gray.append(check.path)
    assert gray, "the subset was chosen to hold some of Imagenette's grayscale photos"
    assert [c.path for c in checks if c.kind == GRAYSCALE] == gray
    assert {c.kind for c in checks if c.path not in gray} == {OK}
    # Grayscale decodes to RGB in both loaders; data.verify still asks for a re-encode, so it exits 1.
    assert verify_main([str(imagenette_subset), "--workers", "2"]) == 1
    assert f"checked {len(checks)} files: {len(gray)} problems, 0 fixed" in capsys.readouterr().out
    result = bench_loader.screen_rate(str(imagenette_subset), cold=False)
    assert (result["files"], result["bad"]) == (10 * TRAIN_PER_CLASS, 0)
