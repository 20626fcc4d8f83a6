"""A vector-quantizing image tokenizer that needs no download: a codebook of patch centroids fitted
with seeded k-means. An image is resized to ``image_size`` x ``image_size`` RGB, cut into
``patch_size`` x ``patch_size`` patches, and each patch becomes the index of its nearest centroid;
decoding puts the centroids back. A learned VQ tokenizer (Chameleon's) plugs in through the same
interface: ``codebook_size``, ``encode(image) -> int grid``, ``decode(grid) -> uint8 image``."""

import json
from pathlib import Path
from typing import Iterable, Union

import numpy as np

META = "moma_image_tokenizer.json"


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 arrays (0..255), got {image.dtype}.")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"images must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}.")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[:, :, :3]


class PatchKMeansTokenizer:
    kind = "patch_kmeans"

    def __init__(self, codebook: np.ndarray, image_size: int, patch_size: int):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}.")
        self.codebook = codebook.astype(np.float32)  # [K, patch_size * patch_size * 3]
        self.image_size, self.patch_size = image_size, patch_size
        self.codebook_size = len(codebook)
        self.grid = image_size // patch_size

    def resize(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        image = _as_rgb_uint8(image)
        resized = Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(resized)

    def patches(self, image: np.ndarray) -> np.ndarray:
        """[grid*grid, p*p*3] float patches of the resized image, row-major."""
        g, p = self.grid, self.patch_size
        x = self.resize(image).astype(np.float32).reshape(g, p, g, p, 3)
        return x.transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """uint8 image -> [grid, grid] codes in [0, codebook_size)."""
        patches = self.patches(image)
        distances = ((patches[:, None, :] - self.codebook[None]) ** 2).sum(-1)
        return distances.argmin(1).reshape(self.grid, self.grid)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[grid, grid] (or flat) codes -> [image_size, image_size, 3] uint8 image."""
        codes = np.asarray(codes).reshape(-1)
        if codes.size != self.grid * self.grid or codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"expected {self.grid * self.grid} codes in [0, {self.codebook_size}).")
        g, p = self.grid, self.patch_size
        x = self.codebook[codes].reshape(g, g, p, p, 3).transpose(0, 2, 1, 3, 4)
        return x.reshape(self.image_size, self.image_size, 3).round().clip(0, 255).astype(np.uint8)

    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @classmethod
    def fit(cls, images: Iterable[np.ndarray], image_size: int = 16, patch_size: int = 4,
            codebook_size: int = 256, seed: int = 1234, iterations: int = 20) -> "PatchKMeansTokenizer":
        """Seeded k-means (k-means++ start, Lloyd iterations) on the patches of ``images``."""
        tokenizer = cls(np.zeros((1, patch_size * patch_size * 3)), image_size, patch_size)
        patches = np.concatenate([tokenizer.patches(image) for image in images])
        if len(patches) < codebook_size:
            raise ValueError(f"{len(patches)} patches cannot fit a codebook of {codebook_size}; "
                             "use more images or a smaller codebook.")
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters=codebook_size, n_init=1, max_iter=iterations, random_state=seed)
        kmeans.fit(patches)
        return cls(kmeans.cluster_centers_, image_size, patch_size)

    def save(self, directory: Union[str, Path]):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "codebook.npy", self.codebook)
        (directory / META).write_text(json.dumps(
            {"kind": self.kind, "image_size": self.image_size, "patch_size": self.patch_size}))


def load_image_tokenizer(directory: Union[str, Path]) -> PatchKMeansTokenizer:
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: not a saved moma_plugin image tokenizer.")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] != PatchKMeansTokenizer.kind:
        raise ValueError(f"{meta_path}: unknown image tokenizer kind {meta['kind']!r}")
    return PatchKMeansTokenizer(np.load(directory / "codebook.npy"), meta["image_size"],
                                meta["patch_size"])


def reconstruction_error(tokenizer: PatchKMeansTokenizer, images: Iterable[np.ndarray]) -> float:
    """Mean absolute pixel error (0..255) of decode(encode(image)) against the resized image."""
    errors = [np.abs(tokenizer.decode(tokenizer.encode(image)).astype(np.float32)
                     - tokenizer.resize(image).astype(np.float32)).mean() for image in images]
    return float(np.mean(errors))
