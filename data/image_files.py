"""What makes an image file usable: the quick screen the loaders run over every file before decoding any, the full
check data.verify runs, and the error that names the bad files. Both checks use the same problem kinds, so the
loader's errors and data.verify's report read alike.

ImageNet itself ships a PNG named .JPEG, CMYK and grayscale JPEGs; copies get truncated or zeroed. Decoders differ
in what they forgive (nvJPEG and DALI are stricter than PIL), so data.verify wants a complete baseline RGB JPEG, or
an RGB PNG named .png (lossless small images, such as data.prepare_cifar writes).
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from common.errors import DataError

OK = "ok"
# Problems no re-encoding can repair: the pixels are gone or cannot be read.
ZERO_BYTE, NOT_AN_IMAGE, TRUNCATED, CORRUPT = "zero-byte", "not-an-image", "truncated", "corrupt"
UNREADABLE = "unreadable"
UNFIXABLE = (ZERO_BYTE, NOT_AN_IMAGE, TRUNCATED, CORRUPT, UNREADABLE)
# Decodable, but not an RGB JPEG: re-encoding repairs them.
NOT_JPEG, CMYK, GRAYSCALE, OTHER_MODE = "not-jpeg", "cmyk", "grayscale", "other-mode"

# JPEG and PNG: what both DALI and PIL decode to RGB (the CMYK and grayscale JPEGs and the PNG too, to the pixel).
# DALI's decoder fed anything else fails with a bare nvImageCodec status that names no file, or crashes the process,
# so the screen keeps every other file away from it.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
# A file open on a network file system waits for a round trip: threads overlap them. Chunks keep the per-file cost
# of the pool small where the files are in the page cache.
SCREEN_THREADS = 16
SCREEN_CHUNK = 256
NAMED_AT_MOST = 10

BadFile = Tuple[str, str, str]
"""(path, kind, detail)."""


def _jpeg_has_eoi(data: bytes) -> bool:
    # PIL decodes a JPEG cut just before its end-of-image marker without complaint; nvJPEG does not. Markers cannot
    # occur inside entropy-coded data (0xFF is byte-stuffed), so a complete file has an EOI after its last
    # start-of-scan; an EXIF thumbnail's own EOI comes before the main scans, and trailing bytes after EOI are harmless.
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def check_file(path: Path) -> Tuple[str, str]:
    """The problem kind of one file (OK if none) and a detail for the report: a full read and decode."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return UNREADABLE, error.strerror or str(error)
    if not data:
        return ZERO_BYTE, ""
    try:
        with Image.open(path) as image:
            image_format, mode = image.format, image.mode
            image.load()
    except UnidentifiedImageError:
        return NOT_AN_IMAGE, f"it starts with {data[:32]!r}"
    except OSError as error:
        return (TRUNCATED if "truncated" in str(error).lower() else CORRUPT), str(error)
    except (ValueError, SyntaxError) as error:
        return CORRUPT, str(error)
    if image_format == "PNG" and path.suffix.lower() == ".png":
        return (OK, "") if mode == "RGB" else (OTHER_MODE, f"PNG {mode}")
    if image_format != "JPEG":
        return NOT_JPEG, f"{image_format} {mode}"
    if not _jpeg_has_eoi(data):
        return TRUNCATED, "no end-of-image marker after the last scan"
    if mode == "CMYK":
        return CMYK, ""
    if mode == "L":
        return GRAYSCALE, ""
    if mode != "RGB":
        return OTHER_MODE, mode
    return OK, ""


def _starts_like_an_image(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.read(fd, len(SIGNATURES[1])).startswith(SIGNATURES)
    except OSError:
        return False
    finally:
        os.close(fd)


def _screen_chunk(paths: Sequence[str]) -> List[str]:
    return [p for p in paths if not _starts_like_an_image(p)]


def screen(paths: Sequence[str]) -> List[BadFile]:
    """The files that do not start like a JPEG or PNG (empty and unreadable ones among them), each with the kind
    check_file gives it. Reads the first 8 bytes of every file; only those that fail get the full check."""
    chunks = [paths[i:i + SCREEN_CHUNK] for i in range(0, len(paths), SCREEN_CHUNK)]
    with ThreadPoolExecutor(SCREEN_THREADS) as pool:
        failed = [p for chunk in pool.map(_screen_chunk, chunks) for p in chunk]
    # check_file passes only JPEGs, which start with the JPEG signature: every failed file keeps a problem kind.
    return [(p, *check_file(Path(p))) for p in failed]


def undecodable(paths: Sequence[str], decoder_message: str) -> List[BadFile]:
    """The files of a batch whose decoding failed that cannot be decoded: those check_file finds unfixable, and any
    the decoder's message names although PIL decodes it. CMYK, grayscale and PNG files decode (they are not named:
    the failure may have another cause)."""
    found = []
    for path in paths:
        kind, detail = check_file(Path(path))
        if kind in UNFIXABLE:
            found.append((path, kind, detail))
        elif path in decoder_message:
            found.append((path, CORRUPT, f"the loader's decoder failed on it, though PIL reads it as {kind}"))
    return found


def bad_files_error(what: str, bad: Sequence[BadFile], split_dir: str) -> DataError:
    """A DataError that names the bad files and how to leave them out (train) or repair them (val)."""
    lines = [f"  {path}: {kind}" + (f" ({detail})" if detail else "") for path, kind, detail in bad[:NAMED_AT_MOST]]
    if len(bad) > NAMED_AT_MOST:
        lines.append(f"  ... and {len(bad) - NAMED_AT_MOST} more")
    root, split = os.path.split(os.path.normpath(split_dir))
    if split == "train":
        listed = os.path.join(root, "train_files.txt")
        advice = (f"`python -m data.verify {root} --fix --file-list {listed}` re-encodes the files that can be and "
                  f"lists the usable train files; then train with data.file_list={listed}")
    else:
        advice = (f"`python -m data.verify {root} --fix` re-encodes the files that can be; move the others out of "
                  f"{split_dir} (data.file_list filters train files only)")
    return DataError(f"{what}:\n" + "\n".join(lines) + f"\n{advice}")
