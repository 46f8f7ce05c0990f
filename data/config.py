"""The data component's configuration: what the loader reads and how it preprocesses."""
from dataclasses import dataclass, field
from typing import List, Optional

from common.errors import ConfigError
from data.resolution import ResolutionConfig

SEED_MEAN = [123.68, 116.78, 103.94]
TORCHVISION_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
TORCHVISION_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
BACKENDS = ("dali", "torchvision", "synthetic")
FORMATS = ("folder", "webdataset")
TORCHVISION_DECODERS = ("pil", "tensor")
TRAIN_CROPS = ("random_resized", "pad_crop")
MAX_IMAGE_SIZE = 4096
MAX_VAL_RESIZE = 8192
MAX_THREADS = 1024
MAX_PREFETCH = 32
MAX_CLASSES = 100_000
MAX_SHUFFLE_BUFFER = 1 << 20


@dataclass
class DataConfig:
    root: str = "/data/imagenet"
    """Dataset root holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; with format=webdataset, the shard directory
    (its manifest.json) that data.make_shards wrote."""
    format: str = "folder"
    """How the dataset is stored: folder (one file per image) or webdataset (tar shards from data.make_shards, read
    by the dali backend)."""
    demo: bool = False
    """Generate the project's demo dataset at data.root if it is not there (the embedded default); with
    format=webdataset, generate it in data.root/source and write it as shards into data.root."""
    backend: str = "dali"
    """Input pipeline: dali (GPU decode, or CPU where there is no GPU), torchvision (PIL), synthetic."""
    image_size: int = 224
    """Side of the square training and validation crops, in pixels. At most 4096: one such crop is 200 MB in
    fp32, and at 100000 DALI's resize fails with std::bad_alloc. data.resolution and data.val_image_size, when
    set, replace it for the train and the val crop."""
    resolution: Optional[ResolutionConfig] = None
    """Progressive resizing of the train crop (FFCV's): {min_res, max_res, start_ramp, end_ramp, step}, the ramp in
    fractions of train.epochs (data/resolution.py); null trains at image_size throughout. Not with pad_crop."""
    val_image_size: Optional[int] = None
    """Side of the validation centre crop; null is image_size. At most val_resize."""
    val_resize: int = 256
    """Validation: the shorter side is resized to this before the center crop. At most 8192 (twice the largest
    crop), for the same reason."""
    train_crop: str = "random_resized"
    """The training crop: random_resized (RandomResizedCrop to image_size: ImageNet's, with crop_area and
    crop_aspect) or pad_crop (zero-pad by `pad` pixels on every side, then a random image_size window: He et al.'s
    CIFAR augmentation, torchvision's RandomCrop(image_size, padding=pad)). Both flip at random; val is unchanged
    (shorter side to val_resize, centre crop: set val_resize=image_size to test on the unpadded image)."""
    pad: int = 4
    """train_crop=pad_crop: zero pixels added on every side before the crop (the paper's 4). At most image_size.
    An image smaller than image_size - 2 x pad is padded further on its right and bottom by DALI, and refused by
    torchvision's RandomCrop."""
    crop_area: List[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range, as a fraction of the image."""
    crop_aspect: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range."""
    train_antialias: bool = True
    """Antialias the training crop's resize to image_size, as torchvision's RandomResizedCrop does. false makes
    DALI's CPU train pipeline about 1.2x cheaper on photographs (the resize is most of its cost) for aliased edges
    on shrunk crops (mean change 0.7 of 255; docs/performance.md); on a GPU it costs next to nothing."""
    mean: List[float] = field(default_factory=lambda: list(SEED_MEAN))
    """Per-channel RGB mean subtracted from 0-255 pixels (the seed's 123.68/116.78/103.94)."""
    std: Optional[List[float]] = None
    """Per-channel divisor after mean subtraction; null keeps the seed's recipe (no division)."""
    num_threads: int = 4
    """CPU threads per process for decoding and augmentation (DALI) or loader workers (torchvision). At most
    1024, past any host's core count."""
    prefetch: int = 2
    """Batches prepared ahead of the one being consumed. At most 32: each one is held in memory (on the GPU for
    DALI), and a few already hide the decoding jitter."""
    hw_decoder_load: float = 0.65
    """Share of JPEG decoding sent to the A100/H100 hardware decoder (GPU decode only)."""
    mmap: bool = True
    """DALI maps each file into memory to read it; set false on network file systems (Lustre, GPFS, NFS), where
    DALI's documentation says mapping brings no benefit, to read with plain file I/O."""
    file_list: Optional[str] = None
    """Optional verified list of train files (from data.verify --file-list); others are skipped."""
    torchvision_decoder: str = "pil"
    """JPEG decoding of the torchvision backend: pil (ImageFolder's loader, PIL transforms) or tensor
    (torchvision.io.decode_jpeg, then the v2 transforms on uint8 tensors)."""
    num_classes: int = 1000
    """Classes of the synthetic backend; the folder backends take it from the dataset. At most 100000 (ImageNet-21k
    has 21841): the loader names every class and the classifier has one output each."""
    synthetic_samples: int = 1281167
    """Images per epoch of the synthetic backend."""
    shuffle_buffer: int = 1024
    """format=webdataset: samples each rank's train reader draws from at random (DALI's initial_fill); more mixes
    further at the cost of memory (that many encoded images per rank) and a slower first batch. At most 1048576."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError("data.backend", f"got {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.format not in FORMATS:
            raise ConfigError("data.format", f"got {self.format!r}; allowed: {', '.join(FORMATS)}")
        if self.format == "webdataset" and self.backend != "dali":
            raise ConfigError("data.format", f"webdataset shards are read by data.backend=dali, not {self.backend}")
        if self.format == "webdataset" and self.file_list is not None:
            raise ConfigError("data.file_list", "filters folder files; with data.format=webdataset give it to "
                                                "data.make_shards --file-list instead")
        if not 1 <= self.shuffle_buffer <= MAX_SHUFFLE_BUFFER:
            raise ConfigError("data.shuffle_buffer", f"must be in [1, {MAX_SHUFFLE_BUFFER}], got {self.shuffle_buffer}")
        if not 0 < self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError("data.image_size", f"must be in [1, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if self.val_image_size is not None and not 0 < self.val_image_size <= MAX_IMAGE_SIZE:
            raise ConfigError("data.val_image_size", f"must be in [1, {MAX_IMAGE_SIZE}] or null, got "
                                                     f"{self.val_image_size}")
        crop = "data.val_image_size" if self.val_image_size is not None else "data.image_size"
        if not self.val_crop <= self.val_resize <= MAX_VAL_RESIZE:
            raise ConfigError("data.val_resize", f"must be in [{crop} ({self.val_crop}), "
                                                 f"{MAX_VAL_RESIZE}], got {self.val_resize}")
        if self.resolution is not None and self.train_crop == "pad_crop":
            raise ConfigError("data.resolution", "progressive resizing resizes the random_resized crop; "
                                                 "data.train_crop=pad_crop takes a fixed window: set one of them")
        if self.train_crop not in TRAIN_CROPS:
            raise ConfigError("data.train_crop", f"got {self.train_crop!r}; allowed: {', '.join(TRAIN_CROPS)}")
        if not 0 <= self.pad <= self.image_size:
            raise ConfigError("data.pad", f"must be in [0, data.image_size ({self.image_size})], got {self.pad}")
        for key, pair in (("data.crop_area", self.crop_area), ("data.crop_aspect", self.crop_aspect)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ConfigError(key, f"must be [low, high] with 0 < low <= high, got {list(pair)}")
        if self.crop_area[1] > 1:
            raise ConfigError("data.crop_area",
                              f"the upper bound is a fraction of the image (<= 1), got {self.crop_area[1]}")
        if len(self.mean) != 3:
            raise ConfigError("data.mean", f"needs 3 values (R, G, B), got {len(self.mean)}")
        if self.std is not None and (len(self.std) != 3 or min(self.std) <= 0):
            raise ConfigError("data.std", f"needs 3 positive values (R, G, B) or null, got {list(self.std)}")
        if not 1 <= self.num_threads <= MAX_THREADS:
            raise ConfigError("data.num_threads", f"must be in [1, {MAX_THREADS}], got {self.num_threads}")
        if not 1 <= self.prefetch <= MAX_PREFETCH:
            raise ConfigError("data.prefetch", f"must be in [1, {MAX_PREFETCH}], got {self.prefetch}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ConfigError("data.hw_decoder_load", f"must be in [0, 1], got {self.hw_decoder_load}")
        if self.torchvision_decoder not in TORCHVISION_DECODERS:
            raise ConfigError("data.torchvision_decoder",
                              f"got {self.torchvision_decoder!r}; allowed: {', '.join(TORCHVISION_DECODERS)}")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ConfigError("data.num_classes", f"must be in [1, {MAX_CLASSES}], got {self.num_classes}")
        if self.synthetic_samples < 1:
            raise ConfigError("data.synthetic_samples", f"must be >= 1, got {self.synthetic_samples}")


    @property
    def val_crop(self) -> int:
        """Side of the validation centre crop."""
        return self.image_size if self.val_image_size is None else self.val_image_size


def preprocessing(cfg: DataConfig) -> dict:
    """What a model trained on this data expects, recorded in every checkpoint so that its weights can be used
    elsewhere: RGB pixels in 0-255, minus `mean`, divided by `std` (1 when null); val resizes the shorter side
    to `val_resize` and centre-crops `val_image_size`; `image_size` is the train crop's (without data.resolution)."""
    return {"pixel_range": [0, 255], "channels": "RGB", "mean": list(cfg.mean),
            "std": list(cfg.std) if cfg.std is not None else None, "image_size": cfg.image_size,
            "val_resize": cfg.val_resize, "val_image_size": cfg.val_crop}
