"""Turn the user's `model` argument into a local Hugging Face folder.

None selects the embedded default; a .gguf file (or a folder holding exactly one .gguf and no
config.json) is converted once into the cache; a folder with config.json is used as it is.
"""

from __future__ import annotations

from pathlib import Path

from infinillm.model.default_model import (
    cache_dir,
    convert_gguf,
    default_model_path,
    is_converted,
)


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(model)!r} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(
                f"model folder {str(model)!r} has no config.json and {len(ggufs)} .gguf files"
            )
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ValueError(f"model {str(model)!r} is neither a model folder nor a .gguf file")
    stat = path.stat()
    target = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if is_converted(target):
        return target
    return convert_gguf(path, target)
