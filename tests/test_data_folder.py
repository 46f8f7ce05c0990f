"""The folder layout: class order, suffixes, file lists, and errors that name the path at fault."""
import os

import pytest

from data.errors import DataError
from data.folder import list_split
from tests.helpers import CLASSES, make_coded


@pytest.fixture
def root(tmp_path):
    make_coded(str(tmp_path), train_per_class=3, val_per_class=2)
    return str(tmp_path)


def test_classes_are_sorted_folders_and_all_suffixes_count(root):
    os.rename(os.path.join(root, "train", "n03"), os.path.join(root, "train", "a00"))
    os.rename(os.path.join(root, "val", "n03"), os.path.join(root, "val", "a00"))
    open(os.path.join(root, "train", "n01", "notes.txt"), "w").close()
    images = list_split(root, "train")
    assert images.classes == ["a00", "n01", "n02"]
    assert len(images) == 9 and images.labels == [0] * 3 + [1] * 3 + [2] * 3
    assert {f.rsplit(".", 1)[1] for f in images.files} == {"JPEG", "jpg", "jpeg"}
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
