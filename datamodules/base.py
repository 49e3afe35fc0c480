"""What every dataset module provides: normalised samples with stable ids, and trials.

A trial is one private batch: ``batch_size`` distinct samples of the attack split, drawn
deterministically from ``seed``. The test dataloader yields one trial per item, so Lightning's
distributed sampler shards trials (not samples) over processes.

Federated settings: with ``num_clients > 1`` the attack split is partitioned among clients
(``iid``, ``dirichlet`` by label, or ``group`` by identity/patient, see
:mod:`leakbench.datamodules.partition`) and every trial draws its batch from one client.

Datasets read from disk subclass :class:`FileDataModule`: their ``root`` defaults to
``$LEAKBENCH_DATA/<name>`` (``./data/<name>`` when the variable is unset), and bad data raises
:class:`DatasetError` naming the file and what was expected.
"""

from __future__ import annotations

import os
import textwrap
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image, ImageFile
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from leakbench.datamodules.partition import PARTITIONS, partition_indices

DATA_ENV = "LEAKBENCH_DATA"
DEFAULT_DATA_DIR = "data"

# ImageNet statistics, the normalisation of the photographic datasets; the grey variant is
# their channel average.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)


class DatasetError(ValueError):
    """The data on disk is not what the dataset expects; the message names the file."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, split file or image is missing."""


def resolve_root(name: str, root: str | os.PathLike[str] | None) -> Path:
    """``root`` if given, else ``$LEAKBENCH_DATA/<name>`` (``./data/<name>`` if unset)."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser() / name


class SampleDataset(Dataset):
    """In-memory samples: pixels in [0, 1] (or uint8 in [0, 255]), normalised on access.

    Items are (x, y, sample_id). ``groups`` optionally holds each sample's identity or patient.
    """

    def __init__(
        self,
        pixels: Tensor,
        labels: Tensor,
        sample_ids: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        groups: Sequence[str] | None = None,
    ) -> None:
        if not (len(pixels) == len(labels) == len(sample_ids)):
            raise ValueError("pixels, labels and sample ids must have the same length")
        if groups is not None and len(groups) != len(labels):
            raise ValueError("groups and labels must have the same length")
        # uint8 stays uint8 (4x less memory for large arrays) and is scaled on access.
        self.pixels = pixels if pixels.dtype == torch.uint8 else pixels.float()
        self.labels = labels.long()
        self.sample_ids = list(sample_ids)
        self.groups = list(groups) if groups is not None else None
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        x = self.pixels[i]
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return (x - self.mean) / self.std, int(self.labels[i]), self.sample_ids[i]


@dataclass(frozen=True)
class ImageSpec:
    """How an image file becomes a (C, R, R) tensor in [0, 1].

    A centered square of side ``crop_fraction`` times the shorter image side is cut out and
    resized to ``resolution`` × ``resolution`` (PIL bilinear, antialiased when shrinking), in
    grey (``channels=1``) or RGB (``channels=3``).
    """

    resolution: int
    channels: int
    crop_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"the resolution must be positive, got {self.resolution}")
        if self.channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, got {self.channels}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"the crop fraction must be in (0, 1], got {self.crop_fraction}")

    def load(self, path: Path) -> Tensor:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as grey
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.convert("L" if self.channels == 1 else "RGB")
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{path}: image file not found") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"{path}: unreadable or truncated image ({exc}); expected a complete image file"
            ) from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        width, height = image.size
        side = max(1, round(self.crop_fraction * min(width, height)))
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize(
            (self.resolution, self.resolution),
            Image.Resampling.BILINEAR,
            box=(left, top, left + side, top + side),
        )
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        return pixels.unsqueeze(0) if self.channels == 1 else pixels.permute(2, 0, 1)


class ImageFileDataset(Dataset):
    """Samples decoded from image files on access. Items are (x, y, sample_id)."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        sample_ids: Sequence[str],
        spec: ImageSpec,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        groups: Sequence[str] | None = None,
    ) -> None:
        if not (len(paths) == len(labels) == len(sample_ids)):
            raise ValueError("paths, labels and sample ids must have the same length")
        if groups is not None and len(groups) != len(labels):
            raise ValueError("groups and labels must have the same length")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.sample_ids = list(sample_ids)
        self.groups = list(groups) if groups is not None else None
        self.spec = spec
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        x = self.spec.load(self.paths[i])
        return (x - self.mean) / self.std, int(self.labels[i]), self.sample_ids[i]


def _walk(
    indices: np.ndarray, num_batches: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """``num_batches`` rows of distinct indices, walking through seeded permutations."""
    per_pass = len(indices) // batch_size
    passes = -(-num_batches // per_pass)
    order = np.concatenate(
        [rng.permutation(indices)[: per_pass * batch_size] for _ in range(passes)]
    )
    return order[: num_batches * batch_size].reshape(num_batches, batch_size)


class TrialDataset(Dataset):
    """``num_trials`` private batches of ``batch_size`` distinct samples each.

    The plan walks through seeded permutations of the split, so the samples of one trial are
    distinct and consecutive trials cover the split before any sample repeats. With ``clients``
    (index arrays of a partition) each trial draws from one client: ``client`` if given, else
    the clients holding at least a batch, cycled in a seeded order.
    """

    def __init__(
        self,
        samples: Dataset,
        batch_size: int,
        num_trials: int,
        seed: int,
        clients: Sequence[np.ndarray] | None = None,
        client: int | None = None,
    ) -> None:
        n = len(samples)  # type: ignore[arg-type]
        if num_trials < 1:
            raise ValueError(f"the number of trials must be at least 1, got {num_trials}")
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        if batch_size > n:
            raise ValueError(
                f"batch size {batch_size} is larger than the attack split ({n} samples)"
            )
        rng = np.random.default_rng(seed)
        self.samples = samples
        if clients is None:
            self.plan = _walk(np.arange(n), num_trials, batch_size, rng)
            self.trial_clients = np.zeros(num_trials, dtype=np.int64)
            return
        eligible = [c for c, members in enumerate(clients) if len(members) >= batch_size]
        if client is not None:
            if not 0 <= client < len(clients):
                raise ValueError(f"client {client} does not exist ({len(clients)} clients)")
            if client not in eligible:
                raise ValueError(
                    f"client {client} holds {len(clients[client])} samples, fewer than the "
                    f"batch size {batch_size}"
                )
            order = np.array([client])
        elif not eligible:
            raise ValueError(f"no client holds a full batch of {batch_size} samples")
        else:
            order = rng.permutation(eligible)
        self.trial_clients = order[np.arange(num_trials) % len(order)]
        self.plan = np.empty((num_trials, batch_size), dtype=np.int64)
        for c in np.unique(self.trial_clients):
            rows = np.flatnonzero(self.trial_clients == c)
            self.plan[rows] = _walk(np.asarray(clients[c]), len(rows), batch_size, rng)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, trial: int) -> dict[str, Any]:
        """The trial's batch; a sample that cannot be read fails this trial, not the run: the
        item then carries ``error`` (naming the file) and placeholder images of the right shape."""
        items, errors = [], []
        for i in self.plan[trial]:
            try:
                items.append(self.samples[int(i)])
            except Exception as exc:
                sample = _describe_sample(self.samples, int(i))
                errors.append(f"cannot read sample {sample}: {type(exc).__name__}: {exc}")
                items.append(None)
        if errors:
            shape = next((x.shape for x, _, _ in filter(None, items)), None)
            if shape is None:  # no sample of the batch was readable: read its shape elsewhere
                shape = self.samples[_first_readable(self.samples)][0].shape
            ids = getattr(self.samples, "sample_ids", None)
            labels = getattr(self.samples, "labels", None)
            items = [
                item
                if item is not None
                else (
                    torch.zeros(shape),
                    int(labels[int(i)]) if labels is not None else 0,
                    ids[int(i)] if ids is not None else str(int(i)),
                )
                for item, i in zip(items, self.plan[trial], strict=True)
            ]
        result = {
            "trial": trial,
            "client": int(self.trial_clients[trial]),
            "images": torch.stack([x for x, _, _ in items]),
            "labels": torch.tensor([y for _, y, _ in items], dtype=torch.long),
            "sample_ids": [sid for _, _, sid in items],
        }
        if errors:
            result["error"] = "; ".join(errors)
        return result


def _describe_sample(samples: Dataset, index: int) -> str:
    """A sample's id and, for samples read from files, its path."""
    ids = getattr(samples, "sample_ids", None)
    paths = getattr(samples, "paths", None)
    name = str(ids[index]) if ids is not None else f"#{index}"
    return f"{name} ({paths[index]})" if paths is not None else name


def _first_readable(samples: Dataset) -> int:
    for index in range(len(samples)):  # type: ignore[arg-type]
        try:
            samples[index]
        except Exception:
            continue
        return index
    raise ValueError("no sample of the split can be read")


class TrialDataModule(LightningDataModule):
    """Base class: subclasses say how to load a split; trials and loaders come from here.

    Class attributes every subclass sets: ``input_shape`` (C, H, W) after its documented
    resize/crop, ``num_classes``, and the normalisation ``mean``/``std`` the evaluator uses to
    de-normalise. Instances may refine them in ``__init__`` (e.g. a chosen resolution).

    Federated options: ``num_clients`` clients share the attack split under ``partition``
    (``iid``, ``dirichlet`` with concentration ``dirichlet_alpha``, or ``group``), drawn from
    ``partition_seed``; ``client`` pins every trial to one client.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(
        self,
        batch_size: int = 1,
        num_trials: int = 1,
        seed: int = 0,
        split: str = "test",
        train_batch_size: int = 64,
        num_clients: int = 1,
        partition: str = "iid",
        dirichlet_alpha: float = 0.5,
        partition_seed: int = 0,
        client: int | None = None,
    ) -> None:
        super().__init__()
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.splits)}")
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; valid: {', '.join(PARTITIONS)}")
        if num_clients < 1:
            raise ValueError(f"the number of clients must be at least 1, got {num_clients}")
        if client is not None and not 0 <= client < num_clients:
            raise ValueError(f"client {client} does not exist ({num_clients} clients)")
        self.batch_size = batch_size
        self.num_trials = num_trials
        self.seed = seed
        self.split = split
        self.train_batch_size = train_batch_size
        self.num_clients = num_clients
        self.partition = partition
        self.dirichlet_alpha = dirichlet_alpha
        self.partition_seed = partition_seed
        self.client = client
        self._cache: dict[str, Dataset] = {}

    @abstractmethod
    def load_split(self, split: str) -> Dataset:
        """Return the samples of ``split`` as (normalised x, label, sample id) items.

        The dataset also exposes ``labels`` (one int per sample) and ``groups`` (one identity or
        patient id per sample, or None) for client partitions.
        """

    def samples(self, split: str) -> Dataset:
        if split not in self._cache:
            self._cache[split] = self.load_split(split)
        return self._cache[split]

    def clients(self) -> list[np.ndarray]:
        """Sample indices of each client in the attack split (one client: all samples)."""
        samples = self.samples(self.split)
        if self.num_clients == 1:
            return [np.arange(len(samples))]  # type: ignore[arg-type]
        return partition_indices(
            self.partition,
            labels=np.asarray(samples.labels),  # type: ignore[attr-defined]
            groups=getattr(samples, "groups", None),
            num_clients=self.num_clients,
            seed=self.partition_seed,
            alpha=self.dirichlet_alpha,
        )

    def trials(self) -> TrialDataset:
        samples = self.samples(self.split)
        if self.num_clients == 1:
            return TrialDataset(samples, self.batch_size, self.num_trials, self.seed)
        return TrialDataset(
            samples, self.batch_size, self.num_trials, self.seed, self.clients(), self.client
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.trials(), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Plain shuffled mini-batches of the train split, for training victims."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.samples("train"),
            batch_size=self.train_batch_size,
            shuffle=True,
            generator=generator,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "split": self.split,
            "partition": {
                "num_clients": self.num_clients,
                "scheme": self.partition,
                "dirichlet_alpha": self.dirichlet_alpha,
                "seed": self.partition_seed,
                "client": self.client,
            },
        }


class FileDataModule(TrialDataModule):
    """A dataset read from its upstream on-disk layout under ``root``.

    Subclasses set ``layout`` (the expected tree under ``root``) and ``source`` (where the data
    comes from and its licence terms); both appear in every missing-data error. Only datasets
    whose upstream has a stable public URL set ``can_download`` and implement ``download_files``.
    """

    registered_name: ClassVar[str]
    layout: ClassVar[str]
    source: ClassVar[str]
    can_download: ClassVar[bool] = False

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        **trial_options: Any,
    ) -> None:
        super().__init__(**trial_options)
        if download and not self.can_download:
            raise ValueError(
                f"dataset {self.registered_name!r} has no stable public download URL; "
                f"get it by hand: {self.source}"
            )
        self.root = resolve_root(self.registered_name, root)
        self.download = download

    def prepare_data(self) -> None:
        if self.download:
            self.download_files()

    def download_files(self) -> None:
        """Fetch missing files and verify their checksums (only where ``can_download``)."""
        raise NotImplementedError

    def not_found(self, problem: str) -> DatasetNotFoundError:
        """A missing-data error that shows the expected layout and where to get the data."""
        return DatasetNotFoundError(
            f"{problem}\n"
            f"expected layout under {self.root}:\n{textwrap.indent(self.layout.strip(), '  ')}\n"
            f"where to get it: {self.source}"
        )

    def require_root(self) -> Path:
        if not self.root.is_dir():
            raise self.not_found(f"{self.registered_name}: dataset root {self.root} does not exist")
        return self.root

    def require_file(self, path: Path, expected: str) -> Path:
        """``path`` if it is a file, else a missing-data error saying what it should hold."""
        self.require_root()
        if not path.is_file():
            raise self.not_found(f"missing {path}: expected {expected}")
        return path

    def require_dir(self, path: Path, expected: str) -> Path:
        self.require_root()
        if not path.is_dir():
            raise self.not_found(f"missing folder {path}: expected {expected}")
        return path

    def require_images(self, paths: Sequence[Path], listed_in: str) -> None:
        """Raise a missing-data error naming the first of ``paths`` that do not exist."""
        listings: dict[Path, set[str]] = {}
        missing = []
        for path in paths:
            if path.parent not in listings:  # one directory listing instead of a stat per file
                folder = path.parent
                listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listings[path.parent]:
                missing.append(path)
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise self.not_found(
                f"{len(missing)} image files listed in {listed_in} are missing: {shown}{more}"
            )

    def check_notes(self) -> list[str]:
        """Extra findings for ``leakbench data check`` (checksums, split overlaps, ...)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.registered_name, "root": str(self.root), **super().describe()}
