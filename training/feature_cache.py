"""Frozen-tower feature cache: the vision tower's selected features, computed once, read back in training.

LLaVA never trains the tower (both stages) and its preprocessing is deterministic, so the features the projector
reads depend only on the image and on the tower + preprocessing. `build_feature_cache` computes them once, batched
and resumable, and `cached_feature_processor` gives the TRL collator a processor whose images come out as those
features (`vision_features`) instead of `pixel_values`; the model then skips the tower.

Layout of `--vision_feature_cache DIR`:

    DIR/<fingerprint[:16]>/manifest.json              what the features were computed with (the fingerprint's input)
    DIR/<fingerprint[:16]>/features-00000.safetensors one tensor per image, named by the image's content hash

The fingerprint covers the tower's config and weights, `vision_feature_layer`, the select strategy, the pooling,
the image processor's settings, `image_aspect_ratio` and the stored dtype, so a change of any of them builds a new
folder next to the old one instead of reusing features that no longer apply. Images are keyed by their decoded
pixels (mode, size, bytes), so the same picture under two file names is computed once.
"""

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Config fields that do not change what the tower computes.
_IGNORED_CONFIG_KEYS = {
    "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "output_hidden_states",
    "return_dict", "use_cache", "id2label", "label2id",
}


class FeatureCacheError(ValueError):
    """A cache folder that does not fit the model or the data (names the folder and what differs)."""


def image_key(image) -> str:
    """Content hash of a decoded image: the same pixels give the same key whatever the file they came from."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _clean(config: dict) -> dict:
    return {k: v for k, v in sorted(config.items()) if k not in _IGNORED_CONFIG_KEYS and not k.startswith("_")}


def _llava_model(model):
    """The `LlavaModel` of a `LlavaForCausalLM` (or the `LlavaModel` itself)."""
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "get_vision_features") else model


def describe(model, processor, dtype: torch.dtype | None = None) -> dict:
    """Everything the cached features depend on; its hash is the cache's fingerprint."""
    llava = _llava_model(model)
    config = llava.config
    tower = llava.vision_tower
    image_processor = {
        k: v for k, v in processor.image_processor.to_dict().items()
        # Names of classes and of remote code, not settings: a saved checkpoint adds `auto_map`, and stage 2 (from
        # stage 1's checkpoint) must find the cache stage 1 (from the parts) built.
        if k not in ("processor_class", "image_processor_type", "_processor_class", "auto_map")
    }
    return {
        "format": FORMAT_VERSION,
        "vision_config": _clean(config.vision_config.to_dict()),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "image_token_pooling": config.image_token_pooling,
        "image_seq_length": config.image_seq_length,
        "image_processor": json.loads(json.dumps(image_processor, sort_keys=True, default=str)),
        "image_aspect_ratio": processor.image_aspect_ratio,
        "dtype": str(dtype or next(tower.parameters()).dtype).removeprefix("torch."),
        "tower_weights": _weights_digest(tower),
    }


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {b!r}, the model needs {a!r}")
    return out


class VisionFeatureCache:
    """Read access to one cache folder: `features(images)` stacks the stored features of decoded images."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise FeatureCacheError(f"{manifest_path}: no such file: not a vision feature cache folder.") from None
        except ValueError as error:
            raise FeatureCacheError(f"{manifest_path}: unreadable ({error}).") from None
        self.index: dict[str, str] = {}
        for shard in sorted(self.folder.glob("features-*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                self.index.update(dict.fromkeys(f.keys(), shard.name))
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()
        self.computed = 0  # images the last build_feature_cache call added

    @classmethod
    def for_model(cls, root: str | os.PathLike, model, processor, dtype: torch.dtype | None = None) -> "VisionFeatureCache":
        """The folder under `root` for this model's tower and preprocessing, created (empty) if absent.

        `root` may also be such a folder itself: it is used only if it was built with the same tower and
        preprocessing, and refused (naming what differs) otherwise.
        """
        root = Path(root)
        description = describe(model, processor, dtype)
        key = fingerprint(description)
        folder = root if (root / MANIFEST).is_file() else root / key[:16]
        if (folder / MANIFEST).is_file():
            found = json.loads((folder / MANIFEST).read_text())
            if found.get("fingerprint") != key:
                differences = _differences(description, found.get("description", {}))
                raise FeatureCacheError(
                    f"{folder / MANIFEST}: this vision feature cache was built with a different tower or preprocessing "
                    f"and cannot be used for this model:\n  " + "\n  ".join(differences or ["(fingerprint differs)"])
                    + f"\nPass its parent folder ({folder.parent}) to build a cache for this model next to it."
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = {"fingerprint": key, "description": description}
            tmp = folder / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, folder / MANIFEST)
        return cls(folder)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _handle(self, shard: str):
        if os.getpid() != self._pid:  # a forked dataloader worker opens its own files
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self.index[key]).get_tensor(key)

    def features(self, images) -> torch.Tensor:
        """`(num_images, image_seq_length, vision_hidden)` for a flat list of decoded images."""
        tensors = []
        for position, image in enumerate(images):
            key = image_key(image)
            if key not in self.index:
                raise FeatureCacheError(
                    f"{self.folder}: image {position} of the batch ({image.mode} {image.size[0]}x{image.size[1]}, "
                    f"key {key}) is not in the vision feature cache. Build the cache over the data you train on "
                    "(training/sft.py does it for --vision_feature_cache)."
                )
            tensors.append(self.get(key))
        return torch.stack(tensors)

    def __getstate__(self):  # picklable for dataloader workers: file handles are reopened there
        return {**self.__dict__, "_handles": {}}

    def add_shard(self, features: dict[str, torch.Tensor]) -> None:
        """Writes one shard atomically (a killed build leaves whole shards only) and indexes it."""
        numbers = [int(p.name.split("-")[1].split(".")[0]) for p in self.folder.glob("features-*.safetensors")]
        name = f"features-{max(numbers, default=-1) + 1:05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in features.items()}, tmp)
        os.replace(tmp, self.folder / name)
        self.index.update(dict.fromkeys(features, name))


def _flat_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flat_images(item)]
    return [images]


@torch.no_grad()
def _compute(model, processor, images, batch_size: int, device, dtype) -> torch.Tensor:
    llava = _llava_model(model)
    # bf16/fp16 features are computed the way mixed-precision training computes them: under autocast.
    autocast = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    out = []
    for start in range(0, len(images), batch_size):
        # The processor's own image path (pad to square + image processor): exactly what training would feed.
        pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            features = llava.get_vision_features(pixel_values.to(device))
        out.append(features.to("cpu", dtype or features.dtype))
    return torch.cat(out)


def build_feature_cache(
    root: str | os.PathLike,
    model,
    processor,
    datasets,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> VisionFeatureCache:
    """Computes the features of every image of `datasets` (rows with an `images` list) not yet in the cache.

    Resumable: shards are written atomically every `shard_size` new images, and a rerun computes only what is
    missing. `dtype` is what is stored (e.g. bfloat16 for bf16 training; default the tower's).
    """
    cache = VisionFeatureCache.for_model(root, model, processor, dtype)
    llava = _llava_model(model)
    device = torch.device(device) if device is not None else next(llava.vision_tower.parameters()).device
    llava.vision_tower.to(device)
    datasets = [d for d in datasets if d is not None]
    pending: dict[str, object] = {}
    computed = 0

    def flush():
        nonlocal computed
        if pending:
            features = _compute(model, processor, list(pending.values()), batch_size, device, dtype)
            cache.add_shard(dict(zip(pending, features)))
            computed += len(pending)
            pending.clear()

    total = sum(len(d) for d in datasets)
    with tqdm(total=total, unit="record", desc=f"Vision feature cache {cache.folder.name}") as progress:
        for dataset in datasets:
            for rows in dataset.select_columns(["images"]).iter(batch_size=256):
                for image in _flat_images(rows["images"]):
                    key = image_key(image)
                    if key not in cache and key not in pending:
                        pending[key] = image
                        if len(pending) >= shard_size:
                            flush()
                progress.update(len(rows["images"]))
        flush()
    cache.computed = computed
    print(f"[llava] vision feature cache {cache.folder}: {len(cache)} images, {computed} computed now")
    return cache


class _CachedImages:
    """Stands in for a processor's image step: images -> cached `vision_features` plus their token expansion."""

    def __init__(self, processor, cache: VisionFeatureCache):
        self.processor, self.cache = processor, cache

    def __call__(self, images, **kwargs):
        flat = _flat_images(images)
        replacements = [self.processor.replace_image_token({}, image_idx=i) for i in range(len(flat))]
        return {"vision_features": self.cache.features(flat)}, replacements


def cached_feature_processor(processor, cache: VisionFeatureCache):
    """A copy of `processor` whose images become `vision_features` read from `cache` instead of `pixel_values`.

    Text, chat template, image-token expansion, truncation checks and assistant masks are the processor's own, so the
    TRL collator built on it produces the same `input_ids`/`labels` as without the cache.
    """
    proxy = copy.copy(processor)
    proxy._process_images = _CachedImages(proxy, cache)
    return proxy


__all__ = [
    "FeatureCacheError", "VisionFeatureCache", "build_feature_cache", "cached_feature_processor", "describe",
    "fingerprint", "image_key",
]
