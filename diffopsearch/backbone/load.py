"""Load a backbone (the shipped toy or any llava-hf checkpoint) and prepare the embedded default."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import UserError
from .toy import ASSET_DIR

WORLD_VERSION = 1
REQUIRED_FILES = ("config.json", "tokenizer.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # either one (LlavaProcessor / its image processor)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFOPSEARCH_CACHE", Path.home() / ".cache" / "diffopsearch"))


@contextlib.contextmanager
def _lock(path: Path):
    """Inter-process lock, so that several accelerate processes prepare the world only once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def toy_world_dir(seed: int = 0) -> Path:
    return cache_dir() / f"toy-world-v{WORLD_VERSION}-seed{seed}"


def prepare_world(seed: int = 0) -> Path:
    """The toy world on disk, generated on first use (a few seconds) and reused afterwards."""
    from ..data import world

    out = toy_world_dir(seed)
    expected = {"seed": seed, "sizes": world.DEFAULT_SPLIT_SIZES, "grid": world.GRID, "image_size": world.IMAGE_SIZE}
    with _lock(cache_dir() / ".prepare.lock"):
        meta = out / "world.json"
        if not (meta.exists() and json.loads(meta.read_text()) == expected):
            world.write_world(out, seed=seed)
    return out


def check_model_dir(path: Path) -> None:
    """A local backbone directory must be complete: config, tokenizer and weights."""
    if not path.is_dir():
        raise UserError(f"backbone directory {str(path)!r} does not exist: model.path must be a Hugging Face "
                        "model id (e.g. llava-hf/llava-1.5-7b-hf) or a directory written by save_pretrained.")
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if not any((path / f).exists() for f in PROCESSOR_FILES):
        missing.append(" or ".join(PROCESSOR_FILES) + " (the image processor)")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (the weights)")
    if missing:
        raise UserError(f"backbone directory {str(path)!r} is incomplete or half-written: missing "
                        f"{', '.join(missing)}. Re-create it with save_pretrained (for the toy backbone: "
                        "reinstall diffopsearch or run scripts/train_toy.py).")


def prepare_toy(seed: int = 0) -> tuple[Path, Path]:
    """(backbone_dir, dataset_dir) of the embedded default. The trained toy backbone ships in the
    package; the world is generated from its seed into the cache directory."""
    check_model_dir(ASSET_DIR)
    return ASSET_DIR, prepare_world(seed)


def resolve_model_path(model_cfg) -> str:
    path = getattr(model_cfg, "path", "") or ""
    if model_cfg.name == "toy" and not path:
        return str(ASSET_DIR)
    if not path:
        raise UserError(f"model {model_cfg.name!r} has no path: set model.path to a Hugging Face id or a local directory.")
    return path


def pick_device(device: str = "auto"):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backbone(model_cfg="toy", device=None, **fields):
    """(model, processor) for a model config (name, path, dtype, attn_implementation,
    trust_remote_code, revision, device), or for a string: ``"toy"`` (the shipped toy backbone), a
    Hugging Face id or a local directory, with any other ModelConfig field as a keyword
    (``load_backbone("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")``). Local directories are checked
    first, so a missing or half-written one gives a clear error rather than a stack trace from
    transformers."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if isinstance(model_cfg, (str, os.PathLike)):
        from ..config import ModelConfig

        name = str(model_cfg)
        model_cfg = ModelConfig(**fields) if name == "toy" else ModelConfig(name=name, path=name, **fields)
    elif fields:
        raise TypeError("load_backbone takes keyword fields only with a model name or path, not with a config")
    path = resolve_model_path(model_cfg)
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or model_cfg.name == "toy":
        check_model_dir(local)
        path = str(local)
    dtype = getattr(model_cfg, "dtype", "auto") or "auto"
    if dtype != "auto" and not hasattr(torch, dtype):
        raise UserError(f"model.dtype {dtype!r} is not valid: use auto, float32, bfloat16 or float16.")
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                  attn_implementation=getattr(model_cfg, "attn_implementation", "sdpa") or "sdpa",
                  trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
                  revision=getattr(model_cfg, "revision", None))
    from safetensors import SafetensorError

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"],
                                                  revision=kwargs["revision"])
        model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"could not load backbone {path!r}: {e}. Check model.path (a Hugging Face id needs the "
                        "hub or a local cache; offline machines need a local directory).") from e
    except (ValueError, SafetensorError) as e:  # a truncated config / weights file, not valid JSON, ...
        raise UserError(f"backbone {path!r} is damaged or not a LLaVA checkpoint: {type(e).__name__}: {e}. "
                        "Re-create the directory with save_pretrained, or download it again.") from e
    device = device or pick_device(getattr(model_cfg, "device", "auto"))
    model.to(device).eval()
    model.requires_grad_(False)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor
