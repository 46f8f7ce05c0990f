"""The shard directory data.make_shards writes and the webdataset loader reads: file names, DALI's index format,
the manifest, the cheap start-up check of a split's shards against the manifest and the full one (--verify).

DIR/manifest.json names every shard with its sample count, size and sha256; DIR/<split>-NNNNNN.tar holds samples
`<key>.jpg` (or `.png`) + `<key>.cls` (the label as an ASCII integer), and DIR/<split>-NNNNNN.idx is its index in the
format DALI's wds2idx writes: a line `v1.2 <samples>`, then per sample `<ext> <data offset> <size> <member name>` for
each of its members.
"""
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common.errors import DataError

FORMAT = "imagenet-trainer-webdataset"
# Bump when the loader would read a shard directory differently.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"
LABEL_EXT = "cls"
SPLITS = ("train", "val")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def member_key(name: str) -> str:
    """The sample key of a tar member: its name up to the first dot of its last path part, as DALI groups them."""
    dot = name.find(".", name.rfind("/") + 1)
    return name if dot < 0 else name[:dot]


def index_line(members: List[Tuple[str, int, int, str]]) -> str:
    """One sample's index line from its members' (ext, data offset, size, member name)."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members) + "\n"


def index_sample(path: str, line: int) -> Tuple[str, List[str]]:
    """The key and member extensions of the sample on line `line` (1-based, after the header) of an index file."""
    with open(path, errors="replace") as f:
        for number, text in enumerate(f):
            if number == line:
                fields = text.split()
                return member_key(fields[3]) if len(fields) > 3 else "?", fields[0::4]
    return "?", []


def _first_cut_sample(index_path: str, size: int) -> str:
    """The first sample of a shard whose data lies past `size` bytes: where a truncated copy ends."""
    with open(index_path, errors="replace") as f:
        next(f, None)
        for text in f:
            fields = text.split()
            for offset, length, name in zip(fields[1::4], fields[2::4], fields[3::4]):
                if int(offset) + int(length) > size:
                    return name
    return "none (the cut is in the tar's end padding)"


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        hint = (" (it holds train/ and val/ folders: for images in folders use data.format=folder)"
                if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS) else "")
        raise DataError(f"{path} does not exist: data.format=webdataset reads a shard directory written by "
                        f"`python -m data.make_shards ROOT --out {root}`{hint}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read as a shard manifest: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a manifest written by data.make_shards")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has shard format version {manifest.get('format_version')}, this loader reads "
                        f"{FORMAT_VERSION}: write the shards again with this version's data.make_shards")
    if not manifest.get("complete"):
        done = {s: len(manifest["splits"][s]["shards"]) for s in manifest.get("splits", {})}
        raise DataError(f"{path}: make_shards has not finished writing {root} (shards finished so far: {done}); "
                        f"rerun `python -m data.make_shards {manifest.get('source')} --out {root}` to finish it")
    return manifest


@dataclass(frozen=True)
class SplitShards:
    root: str
    """The shard directory."""
    split: str
    classes: List[str]
    """Class names in label order (the folder loader's: sorted class folder names)."""
    tars: List[str]
    indexes: List[str]
    counts: List[int]
    """Samples per shard, as the manifest records them."""
    source: str
    """The image folder the shards were written from."""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def tar_of_index(self) -> Dict[str, str]:
        return dict(zip(self.indexes, self.tars))


def _member_name(tar: str, header_offset: int) -> Optional[str]:
    with open(tar, "rb") as f:
        f.seek(header_offset)
        block = f.read(tarfile.BLOCKSIZE)
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").name
    except tarfile.HeaderError:
        return None


def _check_shard(tar: str, index: str, shard: dict, redo: str):
    for path, what in ((tar, "shard"), (index, f"index of shard {tar}")):
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: the {what}, listed in the manifest. {redo}")
    size = os.path.getsize(tar)
    if size < shard["tar_bytes"]:
        raise DataError(f"shard {tar} is truncated: {size} bytes, the manifest says {shard['tar_bytes']}; the first "
                        f"sample cut is {_first_cut_sample(index, size)}. {redo}")
    if size != shard["tar_bytes"]:
        raise DataError(f"shard {tar} is {size} bytes, the manifest says {shard['tar_bytes']}: a shard of another "
                        f"dataset or a damaged copy. {redo}")
    with open(index, "rb") as f:
        data = f.read()
    lines = data.decode(errors="replace").splitlines()
    if hashlib.sha256(data).hexdigest() != shard["index_sha256"]:
        header = lines[0] if lines else "nothing"
        raise DataError(f"index {index} differs from the manifest's sha256 (it declares {header!r}, the manifest "
                        f"{INDEX_VERSION} {shard['samples']}): the index of another shard or a damaged copy. {redo}")
    # The index is the one make_shards wrote; a tar of the right size but other content (another dataset's, which
    # only --verify's sha256 would tell) rarely has the first and last members where the index says they are.
    for line in (lines[1], lines[-1]):
        fields = line.split()
        offset, name = int(fields[1]), fields[3]
        if _member_name(tar, offset - tarfile.BLOCKSIZE) != name:
            raise DataError(f"shard {tar} does not hold {name} at byte {offset} as its index says: a shard of another "
                            f"dataset or a damaged copy. {redo}")


def check_split(root: str, split: str) -> SplitShards:
    """The split's shards, after the cheap checks of every file against the manifest: a stat of each tar, the sha256
    of each index (a few MB for ImageNet) and two tar headers per shard; data.make_shards --verify compares the
    sha256 of every byte."""
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{os.path.join(root, MANIFEST)} has no {split} split")
    redo = f"`python -m data.make_shards {manifest['source']} --out {root}` rewrites missing or damaged shards"
    shards = manifest["splits"][split]["shards"]
    tars = [os.path.join(root, shard["name"] + ".tar") for shard in shards]
    indexes = [os.path.join(root, shard["name"] + ".idx") for shard in shards]
    for tar, index, shard in zip(tars, indexes, shards):
        _check_shard(tar, index, shard, redo)
    return SplitShards(root=root, split=split, classes=list(manifest["classes"]), tars=tars, indexes=indexes,
                       counts=[s["samples"] for s in shards], source=manifest["source"])


def verify_shards(out) -> List[str]:
    """The files of a finished shard directory that are missing or differ from the manifest (size, sha256)."""
    out = Path(out)
    manifest = read_manifest(str(out))
    problems = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for ext, what in ((".tar", "tar"), (".idx", "index")):
                path = out / f"{shard['name']}{ext}"
                if not path.is_file():
                    problems.append(f"{path}: missing")
                    continue
                if path.stat().st_size != shard[f"{what}_bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {shard[what + '_bytes']}")
                    continue
                sha256 = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        sha256.update(block)
                if sha256.hexdigest() != shard[f"{what}_sha256"]:
                    problems.append(f"{path}: sha256 differs from the manifest's (same size: another file's content)")
    return problems
