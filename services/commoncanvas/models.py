"""Where model weights come from, and the tiny random-weight models the demo and tests run on.

A model source is one of:
- a local directory, used as is;
- an `s3://bucket/prefix` holding a `save_pretrained` layout, downloaded once per machine (or pod) into
  a cache directory: a file lock serialises processes, files go to a temporary directory that is
  renamed into place with a completion stamp inside, so a half-download is never used;
- a Hugging Face hub id (`Salesforce/blip2-opt-2.7b`), returned as is for `from_pretrained(id,
  revision=...)`; offline (HF_HUB_OFFLINE=1) it must already be in the hub cache.

The tiny models are built from configs with seeded random weights and tokenizers trained here on a
built-in corpus, so writing them needs no network. Their outputs are gibberish, but every code path
(processor, generate, decode; text encoder, UNet, VAE, scheduler) is the real one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from commoncanvas.storage import Storage, open_storage

log = logging.getLogger(__name__)

STAMP = ".commoncanvas-complete.json"
# Files a hub snapshot must have for one of our loaders: transformers models, diffusers pipelines.
_HUB_MARKERS = ("config.json", "model_index.json", "processor_config.json")
_TRUE = {"1", "on", "yes", "true"}


class ModelNotAvailableError(FileNotFoundError):
    """The model source cannot be used from here; the message says why and how to provide it."""


def default_model_cache() -> Path:
    """$COMMONCANVAS_MODEL_CACHE, else ~/.cache/commoncanvas/models."""
    env = os.environ.get("COMMONCANVAS_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "commoncanvas" / "models"


def resolve_model_dir(source: str, revision: str | None = None, cache_dir: Path | str | None = None) -> str:
    """What to pass to `from_pretrained`: a local directory, or a hub id the hub (or its cache) serves."""
    text = str(source).strip()
    if not text:
        raise ModelNotAvailableError(
            "the model source is empty: give a local directory, s3:// prefix or hub id"
        )
    if text.startswith("s3://"):
        cache = Path(cache_dir) if cache_dir is not None else default_model_cache()
        return str(fetch_to_cache(open_storage(text), revision, cache))
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelNotAvailableError(
            f"model source {source!r} is a file; expected a save_pretrained directory"
        )
    if text.startswith(("/", ".", "~")) or "://" in text or not _is_hub_id(text):
        raise ModelNotAvailableError(
            f"model directory {source!r} does not exist (resolved to {path.absolute()}); give an existing "
            "local directory, an s3://bucket/prefix or a Hugging Face hub id like Salesforce/blip2-opt-2.7b"
        )
    if _hub_offline() and not _in_hub_cache(text, revision):
        rev = f" at revision {revision!r}" if revision else ""
        raise ModelNotAvailableError(
            f"model {text!r}{rev} is not available offline: HF_HUB_OFFLINE is set and it is not in the "
            f"Hugging Face cache ({_hub_cache_dir()}), and no local directory {text!r} exists. Provide it as "
            "a local directory (`huggingface-cli download` it, or `save_pretrained`) or upload that "
            "directory to object storage and give its s3://bucket/prefix; or unset HF_HUB_OFFLINE where "
            "the hub is reachable."
        )
    return text


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    # The hub library reads these at import time; read them again so a later change counts too.
    from huggingface_hub import constants

    env = (os.environ.get(name, "").lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(value in _TRUE for value in env)


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in _HUB_MARKERS
    )


def cache_key(uri: str, revision: str | None) -> str:
    return hashlib.sha256(f"{uri.rstrip('/')}\n{revision or ''}".encode()).hexdigest()[:24]


def fetch_to_cache(storage: Storage, revision: str | None, cache_dir: Path) -> Path:
    """Copy every object under `storage` into `cache_dir/<key>/` once; concurrent callers wait for it.

    `revision` only tells cache entries apart (object stores have no revisions of a prefix): give a new
    one after re-uploading a model under the same prefix.
    """
    from filelock import FileLock

    target = cache_dir / cache_key(storage.uri, revision)
    if (target / STAMP).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{target.name}.lock")):
        if (target / STAMP).is_file():  # another process finished it while we waited
            return target
        # Holding the lock, anything left for this key is from a process that died mid-way.
        for stale in cache_dir.glob(f".{target.name}.part-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        started = time.monotonic()
        part = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.part-"))
        try:
            count, size = _download_all(storage, part)
            seconds = round(time.monotonic() - started, 3)
            stamp = {
                "uri": storage.uri,
                "revision": revision,
                "files": count,
                "bytes": size,
                "seconds": seconds,
            }
            (part / STAMP).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
            os.replace(part, target)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        log.info("downloaded %s (%d files, %d bytes) to %s", storage.uri, count, size, target)
        return target


def _download_all(storage: Storage, into: Path) -> tuple[int, int]:
    keys = [key for key in storage.list("") if not key.endswith("/")]
    if not keys:
        raise ModelNotAvailableError(
            f"no model files under {storage.uri}: upload a save_pretrained directory there"
        )
    size = 0
    for key in keys:
        relative = Path(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelNotAvailableError(f"refusing object {storage.url(key)}: its key leaves the prefix")
        path = into / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(key, path)
        size += path.stat().st_size
    return len(keys), size


# --- tiny models -------------------------------------------------------------------------------------

# Short caption-like English the tiny tokenizers learn their merges from.
_CORPUS = """\
a photo of a cat sitting on a wooden table next to a window
a dog running on the beach at sunset with waves in the background
a red car parked on a street in front of an old brick building
a group of people standing in a park under tall green trees
a close up of a flower with yellow petals and a bee
a bowl of fruit with apples oranges and bananas on a kitchen counter
a mountain landscape with snow on the peaks and a blue lake below
a black and white picture of a city skyline at night with lights
a boat on a river near a bridge on a cloudy day
a child playing with a ball on the grass in a garden
an old church with a tall tower and a clock in a small town
a plate of food with rice vegetables and a piece of chicken
a bird sitting on a branch of a tree in the winter snow
a train station with people waiting on the platform
a horse standing in a field with a fence and hills behind it
two people riding bicycles down a road through the forest
a painting of a woman wearing a hat and a long dress
a view of the ocean from a cliff with rocks and white foam
a market street with fruit stands and colorful umbrellas
the interior of a room with a sofa a lamp and books on a shelf
a man holding a camera and taking a picture of the sea
a cup of coffee and a newspaper on a table in a cafe
a bus driving on a wet road in the rain
a street sign on a pole in front of a blue sky
an aerial view of a harbor with many small boats
a sheep and a cow grazing on a hill in the country
a bridge over a river with a city in the background at dusk
a plane flying in the sky above the clouds
a family having a picnic on a blanket in the sun
a statue in the middle of a square surrounded by pigeons
"""


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the alphabet byte-level BPE works on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _clip_vocab_and_merges(num_merges: int = 300) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE (words end in `</w>`), learned here: bytes, bytes + `</w>`, merges, specials."""
    byte_map = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus_lines():
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()):
            chars = [byte_map[b] for b in word.encode("utf-8")]
            words[(*chars[:-1], chars[-1] + "</w>")] += 1
    base = list(byte_map.values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Highest count first, ties broken by the pair itself: the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(f"{best[0]} {best[1]}")
        vocab_list.append(best[0] + best[1])
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _opt_style_tokenizer() -> Any:
    """A byte-level BPE shaped like OPT's: `<s> <pad> </s> <unk>` are ids 0-3, `</s>` starts every text.

    Its alphabet is printable ASCII only (other bytes become `<unk>`), so whatever a random model
    generates decodes to printable text rather than control characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    byte_map = _bytes_to_unicode()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=[byte_map[b] for b in range(ord(" "), ord("~") + 1)],
        limit_alphabet=95,
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_lines(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",  # as OPT's: `</s>` both starts and ends a text
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        # Decoder-only generation continues the last token: pad on the left.
        padding_side="left",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return tokenizer


def write_tiny_blip2(output: Path | str, seed: int = 0) -> Path:
    """A tiny random BLIP-2 (ViT -> Q-Former -> OPT) with its processor, in `save_pretrained` layout."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    output = Path(output)
    tokenizer = _opt_style_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    num_query_tokens = 4
    hidden = 32
    config = Blip2Config(
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "initializer_range": 0.02,
        },
        qformer_config={
            "vocab_size": 64,
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "encoder_hidden_size": hidden,
            "cross_attention_frequency": 1,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "word_embed_proj_dim": hidden,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        },
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    # The processor puts `num_query_tokens` <image> tokens before the text; generate() fills them in.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def _clip_tokenizer(workdir: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    (workdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        str(workdir / "vocab.json"),
        str(workdir / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def write_tiny_sd2(output: Path | str, seed: int = 0) -> Path:
    """A tiny random Stable-Diffusion-2-style pipeline (CLIP text encoder, UNet, VAE, DDPM scheduler).

    The VAE has four levels like SD's, so latents are 1/8 of the image side, as the real model's are.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
    text_hidden = 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=text_hidden,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SD2's UNet
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    # Any: diffusers' pipeline classes are only partly typed.
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    return output


def write_tiny_clip(output: Path | str, seed: int = 0) -> Path:
    """A tiny random CLIP (text and vision towers, 32 px images) with its processor: the EvalRun's
    CLIP score and CLIP-FID extractor in the demo and tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp))
        torch.manual_seed(seed)
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        config = CLIPConfig(
            text_config={
                **tower,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={**tower, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=tokenizer,
        )
        output.mkdir(parents=True, exist_ok=True)
        CLIPModel(config).save_pretrained(output, safe_serialization=True)
        processor.save_pretrained(output)
    return output


TINY_INCEPTION_FILE = "inception-tiny.pt"
# A seed whose random tiny CLIP gives some positive image-caption similarities (seed 0 gives none), so
# the demo's and tests' CLIP scores are not all floored at 0.
TINY_CLIP_SEED = 2


def write_tiny_inception(output: Path | str, seed: int = 0) -> Path:
    """A tiny random stand-in for clean-fid's InceptionV3 TorchScript (`inception-2015-12-05.pt`): a
    TorchScript module whose `layers` map (N, 3, 299, 299) normalized pixels to (N, 64, 1, 1) features,
    as the real one's map them to (N, 2048, 1, 1). Returns the file's path."""
    import torch
    from torch import nn

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    class TinyInception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Conv2d(3, 16, kernel_size=7, stride=4),
                nn.ReLU(),
                nn.Conv2d(16, 64, kernel_size=5, stride=4),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    path = output / TINY_INCEPTION_FILE
    # TorchScript, because clean-fid's real network is one; torch marks the API deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(TinyInception().eval()), str(path))
    return path


TINY_WRITERS = {
    "blip2": write_tiny_blip2,
    "sd2": write_tiny_sd2,
    "clip": write_tiny_clip,
    "inception": write_tiny_inception,
}
