"""The feature extractors of the clean-fid protocol: InceptionV3 pool features for FID/KID, CLIP image
embeddings for CLIP-FID, and CLIP image-text similarity for CLIP score.

Images reach the extractors as clean-fid evaluates saved images: uint8 RGB at the run's resolution
(a reference image center-cropped and resized to it with clean-fid's bicubic resizer, a generated
one as the pipeline made it), then clean-fid's "clean" resizer (PIL bicubic, in float) to 299 px.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commoncanvas.storage import open_storage

INCEPTION_SIZE = 299


def local_file(uri: str, cache_dir: Path) -> Path:
    """A file given by local path or s3:// URI, on local disk (an s3 object downloaded once into the
    cache: to a temporary name, then renamed, so a half-download is never loaded)."""
    from commoncanvas.models import cache_key

    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"spec.extractors.inception: {uri} is not a file; give the TorchScript file"
            )
        return path
    parent, _, name = uri.rstrip("/").rpartition("/")
    target = cache_dir / cache_key(uri, None) / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
        os.close(handle)
        open_storage(parent).download_file(name, Path(tmp))
        os.replace(tmp, target)
    return target


@dataclass
class Extractors:
    """InceptionV3 (TorchScript: clean-fid's `inception-2015-12-05.pt`, or a tiny stand-in with the same
    interface) and a transformers CLIP model with its processor, on one device."""

    inception: Any
    clip: Any
    processor: Any
    device: torch.device

    def inception_features(self, images: list[np.ndarray]) -> np.ndarray:
        """Pool features as clean-fid computes them: resized to 299 px by its clean resizer, then the
        network's `layers` on (x - 128) / 128 (what cleanfid.inception_torchscript.InceptionV3W does)."""
        from cleanfid.resize import build_resizer

        resize = build_resizer("clean")
        batch = np.stack([resize(image) for image in images]).transpose(0, 3, 1, 2)
        pixels = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            features = self.inception.layers((pixels - 128) / 128)
        return features.reshape(len(images), -1).float().cpu().numpy()

    def clip_image_features(self, images: list[np.ndarray]) -> np.ndarray:
        """CLIP image embeddings, unnormalized (clean-fid's CLIP-FID features: `encode_image`)."""
        from PIL import Image

        inputs = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
        with torch.inference_mode():
            features = self.clip.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _tensor(features).float().cpu().numpy()

    def clip_text_features(self, prompts: list[str]) -> np.ndarray:
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            features = self.clip.get_text_features(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
            )
        return _tensor(features).float().cpu().numpy()


def _tensor(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor, or (newer transformers) an output holding the pooled one."""
    if isinstance(output, torch.Tensor):
        return output
    pooled: torch.Tensor = output.pooler_output
    return pooled


def clip_scores(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """CLIP score per image-caption pair: 100 x max(cosine similarity, 0) (Hessel et al. 2021, as
    torchmetrics reports it)."""
    images = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    texts = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    scores: np.ndarray = 100 * np.maximum((images * texts).sum(axis=1), 0)
    return scores


def load_extractors(
    inception_uri: str, clip_source: str, cache_dir: Path, device: torch.device
) -> Extractors:
    from transformers import CLIPModel, CLIPProcessor

    from commoncanvas.models import resolve_model_dir

    # clean-fid's InceptionV3 is TorchScript; torch marks loading it deprecated (it still works).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        inception = torch.jit.load(str(local_file(inception_uri, cache_dir)), map_location=device).eval()
    location = resolve_model_dir(clip_source, None, cache_dir)
    processor = CLIPProcessor.from_pretrained(location)
    clip = CLIPModel.from_pretrained(location).to(device).eval()
    return Extractors(inception, clip, processor, device)


def reference_image(data: bytes, resolution: int) -> np.ndarray:
    """An encoded real image as the extractors see it: RGB (EXIF orientation applied), its center
    square resized to `resolution` with clean-fid's bicubic PIL resizer, quantized to uint8 like a
    saved image (the generated ones are saved images too)."""
    from cleanfid.resize import make_resizer

    from commoncanvas.images import decode_reduced

    # Decoded reduced (never below `resolution`), refused above the pixel limit (commoncanvas.images).
    image = decode_reduced(data, resolution).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = np.asarray(image.crop((left, top, left + side, top + side)))
    resized: np.ndarray = make_resizer("PIL", True, "bicubic", (resolution, resolution))(square)
    return resized


def load_pipeline(uri: str, cache_dir: Path, device: torch.device) -> Any:
    """The diffusers pipeline to evaluate (local folder, or s3:// downloaded once into the cache), in
    bfloat16 on GPU, float32 on CPU, with the progress bar off."""
    from diffusers import StableDiffusionPipeline

    from commoncanvas.models import resolve_model_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    location = resolve_model_dir(uri, None, cache_dir)
    pipe: Any = StableDiffusionPipeline.from_pretrained(location, safety_checker=None, torch_dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
