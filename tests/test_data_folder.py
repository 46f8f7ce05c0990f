"""The folder layout (class order, suffixes, file lists, errors that name the path at fault) and the screen of
its files."""
import os
import tarfile

import pytest

from common.errors import DataError
from data.folder import layout_root, list_split
from data.image_files import NOT_AN_IMAGE, NOT_JPEG, SCREEN_CHUNK, UNREADABLE, ZERO_BYTE, bad_files_error, screen
from tests.helpers import CLASSES, encoded, make_coded


@pytest.fixture
def root(tmp_path):
    make_coded(str(tmp_path), train_per_class=3, val_per_class=2)
    return str(tmp_path)


def test_classes_are_sorted_folders_and_all_suffixes_count(root):
    os.rename(os.path.join(root, "train", "n03"), os.path.join(root, "train", "a00"))
    os.rename(os.path.join(root, "val", "n03"), os.path.join(root, "val", "a00"))
    open(os.path.join(root, "train", "n01", "notes.txt"), "w").close()
    with open(os.path.join(root, "train", "n02", "lossless.png"), "wb") as f:
        f.write(encoded(image_format="PNG"))
    images = list_split(root, "train")
    assert images.classes == ["a00", "n01", "n02"]
    assert len(images) == 10 and images.labels == [0] * 3 + [1] * 3 + [2] * 4
    assert {f.rsplit(".", 1)[1] for f in images.files} == {"JPEG", "jpg", "jpeg", "png"}
    assert all(os.path.isfile(p) for p in images.paths())


def test_file_list_keeps_only_the_listed_files(root, tmp_path):
    listed = ["n02/img01.jpg", "train/n01/img00.JPEG"]  # relative to train/, or to the root
    file_list = tmp_path / "verified.txt"
    file_list.write_text("\n".join(listed) + "\n\n")
    images = list_split(root, "train", str(file_list))
    assert images.files == ["n01/img00.JPEG", "n02/img01.jpg"] and images.labels == [0, 1]
    assert images.classes == list(CLASSES)
    assert len(list_split(root, "val", str(file_list))) == 6  # the list filters train only


def test_file_list_naming_unknown_files_is_an_error(root, tmp_path):
    file_list = tmp_path / "verified.txt"
    file_list.write_text("n01/img00.JPEG\nn09/missing.JPEG\n")
    with pytest.raises(DataError, match="n09/missing.JPEG"):
        list_split(root, "train", str(file_list))
    with pytest.raises(DataError, match="nowhere.txt does not exist"):
        list_split(root, "train", str(tmp_path / "nowhere.txt"))


def test_missing_root_and_split(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/absent does not exist"):
        list_split(str(tmp_path / "absent"), "train")
    with pytest.raises(DataError, match=f"{tmp_path}/train does not exist"):
        list_split(str(tmp_path), "train")


def test_empty_split_and_class_without_images(tmp_path):
    os.makedirs(tmp_path / "train")
    with pytest.raises(DataError, match=f"{tmp_path}/train has no class folders"):
        list_split(str(tmp_path), "train")
    os.makedirs(tmp_path / "train" / "n01")
    (tmp_path / "train" / "n01" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=f"{tmp_path}/train/n01 holds no"):
        list_split(str(tmp_path), "train")


def test_train_and_val_class_sets_must_match(root):
    os.makedirs(os.path.join(root, "val", "n99"))
    for split in ("train", "val"):
        with pytest.raises(DataError, match=r"class folders differ .*n99"):
            list_split(root, split)


def test_a_symlink_loop_is_listed_for_the_screen_to_name(root):
    os.symlink("loop.JPEG", os.path.join(root, "train", "n01", "loop.JPEG"))
    assert "n01/loop.JPEG" in list_split(root, "train").files


def test_screen_names_every_file_that_does_not_start_like_a_jpeg_or_png(tmp_path):
    complete = encoded()
    files = {"good.JPEG": complete, "png.JPEG": encoded(image_format="PNG"), "cmyk.JPEG": encoded("CMYK"),
             "gray.JPEG": encoded("L"), "cut.JPEG": complete[:len(complete) // 2],  # the decoder finds this one
             "zero.JPEG": b"", "text.JPEG": b"hello", "gif.JPEG": encoded(image_format="GIF")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "loop.JPEG").symlink_to("loop.JPEG")
    (tmp_path / "folder.JPEG").mkdir()
    bad = screen(sorted(str(p) for p in tmp_path.iterdir()))
    assert {os.path.basename(path): kind for path, kind, _ in bad} == {
        "zero.JPEG": ZERO_BYTE, "text.JPEG": NOT_AN_IMAGE, "gif.JPEG": NOT_JPEG, "loop.JPEG": UNREADABLE,
        "folder.JPEG": UNREADABLE}
    assert dict((os.path.basename(p), d) for p, _, d in bad)["text.JPEG"] == "it starts with b'hello'"


def test_screen_keeps_the_order_across_chunks(tmp_path):
    paths = []
    for i in range(3 * SCREEN_CHUNK + 5):
        paths.append(str(tmp_path / f"{i:04d}.JPEG"))
        (tmp_path / f"{i:04d}.JPEG").write_bytes(b"" if i % SCREEN_CHUNK == 7 else b"\xff\xd8\xff\xe0")
    assert [p for p, _, _ in screen(paths)] == [paths[i] for i in (7, SCREEN_CHUNK + 7, 2 * SCREEN_CHUNK + 7)]


def test_bad_files_error_names_at_most_ten_and_tells_what_to_run(tmp_path):
    bad = [(str(tmp_path / "train" / f"{i}.JPEG"), ZERO_BYTE, "") for i in range(12)]
    message = str(bad_files_error("12 bad", bad, str(tmp_path / "train")))
    assert message.count("zero-byte") == 10 and "... and 2 more" in message
    assert f"python -m data.verify {tmp_path} --fix --file-list {tmp_path}/train_files.txt`" in message
    message = str(bad_files_error("1 bad", bad[:1], str(tmp_path / "val")))
    assert f"python -m data.verify {tmp_path} --fix`" in message and f"move the others out of {tmp_path}/val" in message


def test_layout_root_takes_a_folder_or_its_archive(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "src" / "cifar10" / split / "cat").mkdir(parents=True)
    assert layout_root(tmp_path / "src", tmp_path / "x") == tmp_path / "src" / "cifar10"
    with tarfile.open(tmp_path / "c.tar", "w") as archive:
        archive.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    assert layout_root(tmp_path / "c.tar", tmp_path / "data") == tmp_path / "data" / "cifar10"
    assert not (tmp_path / "data.partial").exists()
    with pytest.raises(DataError, match="no folder with train/ and val/"):
        layout_root(tmp_path / "src" / "cifar10" / "train", tmp_path / "y")
