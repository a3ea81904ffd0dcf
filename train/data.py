"""Datasets for the distillation harness: shapes1000 (embedded), ImageNet folders, CIFAR-100.

Every dataset returns ``(float image tensor C x H x W, normalised; int label)``. Training
augmentation is *seeded per sample*: the random draws for sample ``i`` in epoch ``e`` come from a
seed made of (run seed, epoch, i), not from the global random state. So the data a run sees depends
neither on the number of loader workers nor on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import Dataset

DATASETS = ("shapes1000", "imagenet", "cifar100")

# ---------------------------------------------------------------------------------------------
# shapes1000: class = shape x colour x texture (10 x 10 x 10), rendered procedurally in memory.
# ---------------------------------------------------------------------------------------------

SHAPES = (
    "circle", "square", "triangle", "diamond", "plus",
    "ring", "horizontal bar", "vertical bar", "x", "half disc",
)
COLOURS = {
    "red": (1.00, 0.10, 0.10), "orange": (1.00, 0.55, 0.00), "yellow": (1.00, 1.00, 0.10),
    "green": (0.10, 0.80, 0.10), "cyan": (0.00, 0.90, 0.90), "blue": (0.15, 0.30, 1.00),
    "purple": (0.55, 0.15, 0.90), "magenta": (1.00, 0.20, 0.80), "white": (0.95, 0.95, 0.95),
    "brown": (0.60, 0.35, 0.15),
}
TEXTURES = (
    "solid", "horizontal stripes", "vertical stripes", "diagonal stripes", "anti-diagonal stripes",
    "checker", "dots", "grid", "horizontal ramp", "radial ramp",
)
SHAPES1000_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)

# Per-channel statistics close to those of the rendered images (measured once; any fixed values do).
SHAPES_MEAN = (0.25, 0.23, 0.21)
SHAPES_STD = (0.27, 0.26, 0.25)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def shapes1000_class(shape: int, colour: int, texture: int) -> int:
    """The class index of a (shape, colour, texture) triple, each in ``[0, 10)``."""
    return (shape * len(COLOURS) + colour) * len(TEXTURES) + texture


def shapes1000_attributes(label: int) -> Tuple[int, int, int]:
    """The (shape, colour, texture) triple of a class index."""
    shape, rest = divmod(label, len(COLOURS) * len(TEXTURES))
    colour, texture = divmod(rest, len(TEXTURES))
    return shape, colour, texture


def _radius(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u * u + v * v)


# Each shape is a predicate on shape-local coordinates (u, v), roughly within [-1, 1].
_SHAPE_INSIDE: Tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    lambda u, v: _radius(u, v) <= 1.0,
    lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.82,
    lambda u, v: (v <= 0.8) & (u.abs() <= (v + 0.95) * 0.55),
    lambda u, v: u.abs() + v.abs() <= 1.0,
    lambda u, v: ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95)),
    lambda u, v: (_radius(u, v) <= 1.0) & (_radius(u, v) >= 0.55),
    lambda u, v: (u.abs() <= 1.0) & (v.abs() <= 0.42),
    lambda u, v: (u.abs() <= 0.42) & (v.abs() <= 1.0),
    lambda u, v: (((u - v).abs() <= 0.38) | ((u + v).abs() <= 0.38))
    & (torch.maximum(u.abs(), v.abs()) <= 0.85),
    lambda u, v: (_radius(u, v) <= 1.0) & (v >= -0.1),
)

# Each texture is a brightness pattern in [0, 1] of integer pixel coordinates (x, y), shifted by a
# random phase, or of the shape-local coordinates (u, v) for the ramps.
_TEXTURE_PATTERN: Tuple[Callable[..., torch.Tensor], ...] = (
    lambda x, y, u, v: torch.ones_like(u),
    lambda x, y, u, v: ((y // 2) % 2).float(),
    lambda x, y, u, v: ((x // 2) % 2).float(),
    lambda x, y, u, v: (((x + y) // 2) % 2).float(),
    lambda x, y, u, v: (((x - y) // 2) % 2).float(),
    lambda x, y, u, v: (((x // 2) + (y // 2)) % 2).float(),
    lambda x, y, u, v: 1.0 - ((x % 3 == 0) & (y % 3 == 0)).float(),
    lambda x, y, u, v: 1.0 - ((x % 4 == 0) | (y % 4 == 0)).float(),
    lambda x, y, u, v: ((u + 1.0) / 2.0).clamp(0.0, 1.0),
    lambda x, y, u, v: (1.0 - _radius(u, v)).clamp(0.0, 1.0),
)


def render_shapes1000(
    labels: torch.Tensor, image_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Render one image per label as uint8 (N, 3, S, S); all nuisance draws come from ``generator``.

    Nuisances: position, size, colour jitter, texture phase, background grey level, pixel noise.
    """
    n, s = labels.numel(), image_size
    shape, rest = labels.div(len(COLOURS) * len(TEXTURES), rounding_mode="floor"), labels % 100
    colour, texture = rest.div(len(TEXTURES), rounding_mode="floor"), rest % len(TEXTURES)

    def uniform(lo: float, hi: float, *size: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(size or (n,)), generator=generator)

    half_size = uniform(0.30, 0.42) * s
    cx = uniform(0.0, 1.0) * (s - 2 * half_size) + half_size
    cy = uniform(0.0, 1.0) * (s - 2 * half_size) + half_size
    phase = torch.randint(0, 4, (n,), generator=generator).float().view(n, 1, 1)
    rgb = torch.tensor(list(COLOURS.values()))[colour] + uniform(-0.08, 0.08, n, 3)
    background = uniform(0.0, 0.3).view(n, 1, 1, 1)
    noise = 0.05 * torch.randn(n, 3, s, s, generator=generator)

    coords = torch.arange(s, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(n, s, s), y.expand(n, s, s)
    u = (x - cx.view(n, 1, 1)) / half_size.view(n, 1, 1)
    v = (y - cy.view(n, 1, 1)) / half_size.view(n, 1, 1)

    xi = (x + phase).long()
    yi = (y + phase).long()
    inside = torch.zeros(n, s, s, dtype=torch.bool)
    pattern = torch.zeros(n, s, s)
    for index, predicate in enumerate(_SHAPE_INSIDE):
        chosen = shape == index
        inside[chosen] = predicate(u[chosen], v[chosen])
    for index, texture_of in enumerate(_TEXTURE_PATTERN):
        chosen = texture == index
        pattern[chosen] = texture_of(xi[chosen], yi[chosen], u[chosen], v[chosen])
    inside = inside.unsqueeze(1)  # (N, 1, S, S)
    brightness = 0.35 + 0.65 * pattern.unsqueeze(1)
    fill = rgb.clamp(0, 1).view(n, 3, 1, 1) * brightness
    image = torch.where(inside, fill, background.expand(n, 3, s, s)) + noise
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


class Shapes1000(Dataset):
    """The embedded 1000-class set: ``per_class`` images per class, deterministic from ``seed``.

    The train and validation splits draw from different seed streams, so they never share an image.
    Images are rendered once, in chunks, and kept in memory as uint8 (1000 x 30 x 3 x 32 x 32 is
    about 92 MB).
    """

    def __init__(self, split: str, per_class: int, image_size: int = 32, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        generator = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
        labels = torch.arange(SHAPES1000_CLASSES).repeat_interleave(per_class)
        chunks = [
            render_shapes1000(chunk, image_size, generator) for chunk in labels.split(4096)
        ]
        self.images = torch.cat(chunks)
        self.labels = labels
        self.classes = [
            f"{shape}/{colour}/{texture}"
            for shape in SHAPES for colour in COLOURS for texture in TEXTURES
        ]

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 image in [0, 255] -> float image in [0, 1]."""
    return image.float() / 255.0


class RandomShift:
    """Pad a float image by ``pad`` pixels (edge replicate), crop back at a random offset."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return image
        _, h, w = image.shape
        padded = torch.nn.functional.pad(image[None], [self.pad] * 4, mode="replicate")[0]
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        return padded[:, dy : dy + h, dx : dx + w]


class Normalise:
    """Float image in [0, 1] -> minus mean, over std (per channel)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _compose(*steps: Callable) -> Callable:
    def apply(x):
        for step in steps:
            x = step(x)
        return x

    return apply


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, mixed (splitmix64) from seed, epoch and index."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class SeededTransform(Dataset):
    """Apply ``transform`` to ``base[i]`` with the random state seeded from (seed, epoch, i).

    The global random state is left untouched (``torch.random.fork_rng``), so dropout and the like
    keep their own stream. Call ``set_epoch`` before each epoch (the loop does).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            # The default generator alone: torch.manual_seed would also (lazily) seed every GPU.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), label


class Mapped(Dataset):
    """Apply a deterministic ``transform`` to each image of ``base`` (validation)."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


@dataclass
class DataBundle:
    """What the loop needs: the two datasets, the number of classes and the image size."""

    train: Dataset
    val: Dataset
    num_classes: int
    image_size: int


class DataError(ValueError):
    """A dataset that is missing or malformed; raised before any training starts."""


def _check_image_folder(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(
            f"ImageNet-style data needs {path!r} (ImageFolder layout: {split}/<class>/<image>); "
            "it does not exist"
        )
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise DataError(f"{path!r} holds no class folders (expected {split}/<class>/<image>)")
    return path


def build_data(
    name: str,
    data_dir: Optional[str] = None,
    image_size: int = 32,
    seed: int = 0,
    shapes_train_per_class: int = 20,
    shapes_val_per_class: int = 5,
    augment: bool = True,
) -> DataBundle:
    """Build the train and validation datasets; raise ``DataError`` for missing/malformed data.

    Args:
        name: ``"shapes1000"``, ``"imagenet"`` (ImageFolder train/ and val/ under ``data_dir``) or
            ``"cifar100"`` (torchvision's files under ``data_dir``; never downloaded).
        image_size: side of the square images the model sees (shapes1000 renders at this size).
        seed: the dataset seed (shapes1000 rendering) and the augmentation seed.
        augment: random augmentation on the training split.
    """
    if name == "shapes1000":
        return _shapes1000(image_size, seed, shapes_train_per_class, shapes_val_per_class, augment)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if data_dir is None:
        raise DataError(f"--data {name} needs --data-dir DIR")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist or is not a directory")
    build = _imagenet if name == "imagenet" else _cifar100
    return build(data_dir, image_size, seed, augment)


def _shapes1000(image_size: int, seed: int, train_per_class: int, val_per_class: int,
                augment: bool) -> DataBundle:
    train = Shapes1000("train", train_per_class, image_size, seed)
    val = Shapes1000("val", val_per_class, image_size, seed)
    normalise = Normalise(SHAPES_MEAN, SHAPES_STD)
    val_tf = _compose(to_unit_float, normalise)
    # No flips: they would turn diagonal into anti-diagonal stripes, i.e. change the class.
    shift = RandomShift(max(1, image_size // 8))
    train_tf = _compose(to_unit_float, shift, normalise) if augment else val_tf
    return DataBundle(
        SeededTransform(train, train_tf, seed), Mapped(val, val_tf), SHAPES1000_CLASSES, image_size,
    )


def _imagenet(data_dir: str, image_size: int, seed: int, augment: bool) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    train_dir = _check_image_folder(data_dir, "train")
    val_dir = _check_image_folder(data_dir, "val")
    try:
        train = datasets.ImageFolder(train_dir)
        val = datasets.ImageFolder(val_dir)
    except (FileNotFoundError, RuntimeError) as err:  # e.g. a class folder with no images
        raise DataError(f"malformed ImageFolder data under {data_dir!r}: {err}") from err
    if train.classes != val.classes:
        raise DataError(
            f"train/ has {len(train.classes)} classes and val/ has {len(val.classes)}; "
            "they must hold the same class folders"
        )
    normalise = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val_tf = T.Compose([
        T.Resize(int(math.ceil(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor(),
        normalise,
    ])
    train_tf = T.Compose([
        T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalise,
    ]) if augment else val_tf
    return DataBundle(
        SeededTransform(train, train_tf, seed), Mapped(val, val_tf), len(train.classes), image_size,
    )


def _cifar100(data_dir: str, image_size: int, seed: int, augment: bool) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    try:
        train = datasets.CIFAR100(data_dir, train=True, download=False)
        val = datasets.CIFAR100(data_dir, train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"CIFAR-100 not found or corrupted under {data_dir!r} (expected the extracted "
            f"'cifar-100-python/' folder; nothing is downloaded): {err}"
        ) from err
    normalise = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train_tf = T.Compose(
        resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
                  T.ToTensor(), normalise]
    ) if augment else T.Compose(resize + [T.ToTensor(), normalise])
    val_tf = T.Compose(resize + [T.ToTensor(), normalise])
    return DataBundle(SeededTransform(train, train_tf, seed), Mapped(val, val_tf), 100, image_size)
