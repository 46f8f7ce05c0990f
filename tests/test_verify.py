import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from data.image_files import CMYK, GRAYSCALE, NOT_AN_IMAGE, NOT_JPEG, OK, OTHER_MODE, TRUNCATED, ZERO_BYTE
from data.verify import BACKUP_SUFFIX, main, scan


def _encode(mode: str, image_format: str = "JPEG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, image_format)
    return out.getvalue()


GOOD = {f"train/n01/n01_{i}.JPEG": _encode("RGB", seed=i) for i in range(3)}
GOOD.update({f"train/n02/n02_{i}.JPEG": _encode("RGB", seed=10 + i) for i in range(3)})
GOOD.update({f"val/n01/val_{i}.JPEG": _encode("RGB", seed=20 + i) for i in range(2)})
GOOD["val/n02/val_3.JPEG"] = _encode("RGB", seed=23)
GOOD["train/n02/n02_lossless.png"] = _encode("RGB", "PNG", seed=24)  # as data.prepare_cifar writes
_complete = _encode("RGB", seed=30)
BAD = {
    "train/n01/n01_zero.JPEG": (ZERO_BYTE, b""),
    "train/n01/n01_cut.JPEG": (TRUNCATED, _complete[:len(_complete) // 2]),
    # Only the end-of-image marker is missing: PIL decodes this without complaint, nvJPEG does not.
    "train/n02/n02_noeoi.JPEG": (TRUNCATED, _complete[:-2]),
    "train/n02/n02_text.JPEG": (NOT_AN_IMAGE, b"<html>404 Not Found</html>"),
    "train/n02/n02_png.JPEG": (NOT_JPEG, _encode("RGB", "PNG", seed=31)),
    "train/n02/n02_rgba.png": (OTHER_MODE, _encode("RGBA", "PNG", seed=34)),
    "train/n01/n01_cmyk.JPEG": (CMYK, _encode("CMYK", seed=32)),
    "val/n02/val_gray.JPEG": (GRAYSCALE, _encode("L", seed=33)),
}
FIXABLE = {path for path, (kind, _) in BAD.items() if kind in (NOT_JPEG, CMYK, GRAYSCALE, OTHER_MODE)}


@pytest.fixture
def dataset(tmp_path) -> Path:
    for path, data in list(GOOD.items()) + [(p, d) for p, (_, d) in BAD.items()]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    return tmp_path


def test_the_eoi_check_is_what_catches_a_missing_end_marker(dataset):
    with Image.open(dataset / "train/n02/n02_noeoi.JPEG") as image:
        image.load()


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_flags_exactly_the_bad_files(dataset, workers):
    checks = scan(dataset, workers)
    assert sorted(c.path for c in checks) == sorted(list(GOOD) + list(BAD))
    assert {c.path: c.kind for c in checks if c.kind != OK} == {p: kind for p, (kind, _) in BAD.items()}


def test_report_and_exit_code_without_fix(dataset, capsys):
    assert main([str(dataset), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    for path, (kind, _) in BAD.items():
        assert f"{kind}\t{path}" in report
    for path in GOOD:
        assert path not in report
    for path, (_, data) in BAD.items():
        assert (dataset / path).read_bytes() == data, "nothing changes without --fix"


def test_fix_reencodes_the_decodable_and_lists_only_usable_train_files(dataset):
    file_list = dataset / "train_files.txt"
    assert main([str(dataset), "--fix", "--file-list", str(file_list), "--workers", "2"]) == 0
    for path in FIXABLE:
        data = (dataset / path).read_bytes()
        with Image.open(dataset / path) as image:
            assert (image.format, image.mode) == ("PNG" if path.endswith(".png") else "JPEG", "RGB")
        if not path.endswith(".png"):
            decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            assert decoded.shape[0] == 3
        assert (dataset / (path + BACKUP_SUFFIX)).read_bytes() == BAD[path][1]
    expected = [p.removeprefix("train/") for p in GOOD if p.startswith("train/")]
    expected += [p.removeprefix("train/") for p in FIXABLE if p.startswith("train/")]
    assert file_list.read_text().splitlines() == sorted(expected)
    # The backups are not dataset files; what is left is exactly the unfixable.
    left = {c.path: c.kind for c in scan(dataset, 1) if c.kind != OK}
    assert left == {p: kind for p, (kind, _) in BAD.items() if p not in FIXABLE}


def test_fix_without_a_file_list_still_fails_on_unfixable_files(dataset):
    assert main([str(dataset), "--fix", "--workers", "1"]) == 1


def test_unfixable_val_file_keeps_the_exit_code_non_zero(dataset):
    for path in BAD:
        if path.startswith("train/"):
            (dataset / path).unlink()
    (dataset / "val/n01/val_zero.JPEG").write_bytes(b"")
    assert main([str(dataset), "--fix", "--file-list", str(dataset / "list.txt"), "--workers", "1"]) == 1


def test_clean_dataset_passes(dataset):
    for path in BAD:
        (dataset / path).unlink()
    assert main([str(dataset), "--workers", "1"]) == 0


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert main([str(tmp_path / "missing")]) == 2
    assert "neither train/ nor val/" in capsys.readouterr().err


def test_a_file_that_cannot_be_opened_is_reported_not_a_crash(dataset, capsys):
    (dataset / "train/n01/loop.JPEG").symlink_to("loop.JPEG")
    assert main([str(dataset), "--workers", "1"]) == 1
    assert "unreadable\ttrain/n01/loop.JPEG\tToo many levels of symbolic links" in capsys.readouterr().out
