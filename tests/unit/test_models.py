"""Model sources (local, hub id, object-store cache) and the tiny random-weight models, all offline."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from commoncanvas import models
from commoncanvas.models import STAMP, ModelNotAvailableError, fetch_to_cache, resolve_model_dir
from commoncanvas.storage import LocalStorage


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, our completion stamp left out."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != STAMP
    }


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF offline mode as a pod without the hub sees it, and any network connection fails the test."""
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read the variable at import time; set what they already read too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True, raising=False)

    def no_network(self: socket.socket, address: Any) -> None:
        raise OSError(f"network access in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


# --- tiny models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_tiny_blip2(tmp_path_factory.mktemp("blip2") / "model")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_tiny_sd2(tmp_path_factory.mktemp("sd2") / "model")


def photos(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(count)]


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_tiny_blip2_loads_offline_and_captions_a_batch(tiny_blip2: Path, prompt: str) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2).eval()
    processor = Blip2Processor.from_pretrained(tiny_blip2)
    assert processor.num_query_tokens == model.config.num_query_tokens == 4
    inputs = processor(images=photos(2), text=[prompt] * 2, return_tensors="pt")
    image_token = model.config.image_token_index
    # The processor puts one <image> per query token before BOS; generate() replaces them.
    assert inputs["input_ids"][:, :4].eq(image_token).all()
    assert inputs["input_ids"][:, 4].eq(processor.tokenizer.bos_token_id).all()
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 32, 32)

    out = model.generate(**inputs, max_new_tokens=8, no_repeat_ngram_size=2)
    assert out.shape[0] == 2 and out.shape[1] <= inputs["input_ids"].shape[1] + 8
    captions = processor.batch_decode(out, skip_special_tokens=True)
    assert len(captions) == 2
    for caption in captions:
        assert caption.startswith(prompt) and caption[len(prompt) :].strip()
        assert "<image>" not in caption and "</s>" not in caption
        assert caption.isprintable()


def test_tiny_models_are_deterministic_per_seed(tiny_blip2: Path, tmp_path: Path) -> None:
    again = tree_digest(models.write_tiny_blip2(tmp_path / "same"))
    assert again == tree_digest(tiny_blip2)
    other = tree_digest(models.write_tiny_blip2(tmp_path / "other", seed=1))
    assert {k for k in other if other[k] != again[k]} == {"model.safetensors"}


@pytest.mark.usefixtures("offline")
def test_tiny_sd2_pipeline_loads_offline_and_generates(tiny_sd2: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    size = sum(p.stat().st_size for p in tiny_sd2.rglob("*") if p.is_file())
    assert size < 5_000_000
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8  # SD's latent geometry: a 64 px image has 8x8 latents
    result = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)


def test_cli_writes_a_tiny_model(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from commoncanvas.cli import main

    result = CliRunner().invoke(main, ["models", "tiny", "--kind", "sd2", "--output", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "m")
    assert (tmp_path / "m" / "model_index.json").is_file()


# --- resolve_model_dir: local paths and hub ids ------------------------------------------------------


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert resolve_model_dir(str(tmp_path / "m"), None, tmp_path / "cache") == str(tmp_path / "m")
    assert resolve_model_dir(f"file://{tmp_path / 'm'}", "ignored", tmp_path / "cache") == str(tmp_path / "m")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("source", ["/no/such/model", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_missing_path_says_it_does_not_exist(source: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        resolve_model_dir(source, None, tmp_path)
    assert source in str(info.value) and "s3://" in str(info.value)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="is a file"):
        resolve_model_dir(str(tmp_path / "weights.bin"), None, tmp_path)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.usefixtures("offline")
def test_hub_id_offline_and_not_cached_says_how_to_provide_it(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model_dir("Salesforce/blip2-opt-2.7b", None, tmp_path / "cache")
    message = str(info.value)
    assert "'Salesforce/blip2-opt-2.7b' is not available offline" in message
    assert "local directory" in message and "s3://" in message and str(hub_cache) in message


@pytest.mark.usefixtures("offline")
def test_hub_id_offline_but_cached_is_returned(hub_cache: Path, tmp_path: Path) -> None:
    repo = hub_cache / "models--Salesforce--blip2-opt-2.7b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    assert resolve_model_dir("Salesforce/blip2-opt-2.7b", None, tmp_path) == "Salesforce/blip2-opt-2.7b"
    with pytest.raises(ModelNotAvailableError, match="at revision 'v2'"):
        resolve_model_dir("Salesforce/blip2-opt-2.7b", "v2", tmp_path)


def test_hub_id_online_is_left_to_from_pretrained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_dir("Salesforce/blip2-opt-2.7b", "main", tmp_path) == "Salesforce/blip2-opt-2.7b"


# --- the object-store cache (the same code S3 goes through, here over a local Storage) ----------------


@pytest.fixture
def uploaded(tmp_path: Path) -> LocalStorage:
    source = LocalStorage(tmp_path / "bucket" / "models" / "m")
    source.write_text("model_index.json", '{"_class_name": "X"}')
    source.write_bytes("unet/diffusion_pytorch_model.safetensors", b"\x00" * 1000)
    source.write_text("tokenizer/vocab.json", "{}")
    return source


class Counting:
    """Wraps a Storage's download_file: counts calls, can fail on the n-th, can dawdle."""

    def __init__(self, storage: LocalStorage, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.storage, self.fail_at, self.delay = storage, fail_at, delay
        self.keys: list[str] = []
        self._original = storage.download_file
        self._lock = threading.Lock()

    def __call__(self, key: str, path: Path) -> None:
        with self._lock:
            self.keys.append(key)
            if self.fail_at is not None and len(self.keys) == self.fail_at:
                raise OSError("connection reset")
        time.sleep(self.delay)
        self._original(key, path)


@pytest.fixture
def counting(uploaded: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counting]:
    counter = Counting(uploaded)
    monkeypatch.setattr(uploaded, "download_file", counter)
    yield counter


def test_fetch_copies_the_prefix_once(uploaded: LocalStorage, counting: Counting, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = fetch_to_cache(uploaded, None, cache)
    assert tree_digest(first) == tree_digest(uploaded.root)
    stamp = json.loads((first / STAMP).read_text())
    assert stamp["files"] == 3 and stamp["bytes"] == 1000 + 2 + 20 and stamp["uri"] == uploaded.uri
    assert fetch_to_cache(uploaded, None, cache) == first
    assert len(counting.keys) == 3  # the second call used the cache
    # Another revision is another cache entry.
    assert fetch_to_cache(uploaded, "v2", cache) != first
    assert len(counting.keys) == 6
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        [first.name, models.cache_key(uploaded.uri, "v2")]
    )


def test_half_download_is_never_used(uploaded: LocalStorage, counting: Counting, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = cache / models.cache_key(uploaded.uri, None)
    # What a process killed mid-way leaves: a part directory, and (from older layouts) a stampless target.
    (cache / f".{target.name}.part-dead").mkdir(parents=True)
    target.mkdir()
    (target / "model_index.json").write_text("truncat")
    assert fetch_to_cache(uploaded, None, cache) == target
    assert tree_digest(target) == tree_digest(uploaded.root)
    assert not list(cache.glob(".*.part-*"))


def test_failed_download_leaves_nothing_and_is_retried(
    uploaded: LocalStorage, counting: Counting, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    counting.fail_at = 2
    with pytest.raises(OSError, match="connection reset"):
        fetch_to_cache(uploaded, None, cache)
    assert [p.name for p in cache.iterdir()] == [f"{models.cache_key(uploaded.uri, None)}.lock"]
    counting.fail_at = None
    assert tree_digest(fetch_to_cache(uploaded, None, cache)) == tree_digest(uploaded.root)


def test_empty_prefix_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="no model files under"):
        fetch_to_cache(LocalStorage(tmp_path / "empty"), None, tmp_path / "cache")


def test_concurrent_fetches_download_once(uploaded: LocalStorage, counting: Counting, tmp_path: Path) -> None:
    counting.delay = 0.1  # the first fetch is still copying when the others arrive
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_to_cache(uploaded, None, cache)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert tree_digest(results[0]) == tree_digest(uploaded.root)
    assert len(counting.keys) == 3
