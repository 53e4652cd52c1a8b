"""Image preprocessing: one rules object, and the one cleaning that training, evaluation and inference share.

`ImageRules` holds what decides how an image reaches the model: Qwen's resize factor (patch ×
merge), the pixel budget, the largest aspect ratio and, optionally, one letterboxed size for every
image. The prepare stage builds it from params (`ImageRules.from_params(...).checked()`), the
publish stage records it with each run in the registry (`ImageRules.record`) and the inference CLI
rebuilds it from that record (`ImageRules.from_record`), so a new image is cleaned exactly as the
run's training data was: `clean_image` (RGB, EXIF orientation, transparency onto white, resize or
letterbox, re-encode). Why each rule exists is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 encodes ~2× faster than 6 for a few % more bytes
JPEG_QUALITY = 95  # re-encoding a JPEG source: visually lossless, far below PNG's size for photos
LETTERBOX_FILL = (255, 255, 255)  # white: what charts and diagrams are drawn on


def is_missing(value: Any) -> bool:
    """No value: None, NaN, an empty or blank string, empty bytes (an image column's empty cell)."""
    if value is None or value == b"":
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


class BadImage(ValueError):
    """One image is unusable; `reason` is the key its row is counted under in data_report.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRules:
    factor: int
    min_pixels: int
    max_pixels: int
    max_aspect_ratio: float
    uniform_size: tuple[int, int] | None = None

    @classmethod
    def from_params(cls, params) -> ImageRules:
        """The rules `params.model` and `params.data` set."""
        model, data = params.model, params.data
        uniform = tuple(data.uniform_size) if data.uniform_size else None
        return cls(model.image_factor, model.min_pixels, model.max_pixels, data.max_aspect_ratio, uniform)

    @classmethod
    def from_record(cls, record: dict, params) -> ImageRules:
        """A run's recorded rules; a value the record lacks (runs registered before it was recorded)
        comes from today's params."""
        today = cls.from_params(params)
        uniform = record.get("uniform_size", today.uniform_size)
        return cls(
            factor=record.get("factor", today.factor),
            min_pixels=record.get("min_pixels", today.min_pixels),
            max_pixels=record.get("max_pixels", today.max_pixels),
            max_aspect_ratio=record.get("max_aspect_ratio", today.max_aspect_ratio),
            uniform_size=tuple(uniform) if uniform else None,
        )

    def checked(self) -> ImageRules:
        """These rules, or ValueError when `uniform_size` is a size the model cannot take."""
        if self.uniform_size:
            width, height = self.uniform_size
            if width % self.factor or height % self.factor:
                raise ValueError(f"data.uniform_size {[width, height]} must be multiples of model.image_factor "
                                 f"({self.factor})")
            if not self.min_pixels <= width * height <= self.max_pixels:
                raise ValueError(f"data.uniform_size {[width, height]} is {width * height} pixels, outside "
                                 f"model.min_pixels..max_pixels ({self.min_pixels}..{self.max_pixels})")
        return self

    def record(self) -> dict:
        """The form the registry keeps (`image_preprocessing`), read back by `from_record`."""
        return {"factor": self.factor, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "max_aspect_ratio": self.max_aspect_ratio,
                "uniform_size": list(self.uniform_size) if self.uniform_size else None}

    def tokens(self, size: tuple[int, int]) -> int:
        """Image tokens of an image of `size` (already fitted): one per factor × factor block."""
        return (size[0] // self.factor) * (size[1] // self.factor)


def _image_source(value: Any, base_dir: str | None) -> Any:
    """Raw bytes, a path or a PIL image, from whatever the image column holds."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadImage("missing_image" if not value else "multiple_images")
        value = value[0]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if is_missing(value):
        raise BadImage("missing_image")
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() or not base_dir else Path(base_dir) / value
        if not path.is_file():
            raise BadImage("missing_image")
        return path.read_bytes()
    return value


def decode_image(value: Any, base_dir: str | None):
    """(image, raw bytes or None); every decoder failure, bombs included, is an unreadable image."""
    from PIL import Image

    source = _image_source(value, base_dir)
    if isinstance(source, Image.Image):
        return source, None
    try:
        image = Image.open(io.BytesIO(bytes(source)))
        image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImage("unreadable_image") from None
    return image, bytes(source)


def to_rgb(image):
    """EXIF orientation applied, transparency flattened onto white (not black) so drawings stay legible."""
    from PIL import Image, ImageOps

    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, LETTERBOX_FILL + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_shape(width: int, height: int, rules: ImageRules) -> None:
    if width <= 0 or height <= 0:
        raise BadImage("zero_size_image")
    if max(width, height) / min(width, height) > rules.max_aspect_ratio:
        raise BadImage("extreme_aspect_ratio")


def fitted_size(width: int, height: int, rules: ImageRules) -> tuple[int, int]:
    """Qwen's own rule (qwen-vl-utils smart_resize): sides multiples of the factor, pixels within budget."""
    from qwen_vl_utils import smart_resize

    new_height, new_width = smart_resize(height, width, factor=rules.factor, min_pixels=rules.min_pixels,
                                         max_pixels=rules.max_pixels)
    if new_width <= 0 or new_height <= 0:  # a side rounded down to nothing: too thin for the budget
        raise BadImage("extreme_aspect_ratio")
    return new_width, new_height


def letterbox(image, size: tuple[int, int]):
    """Scale to fit `size` with the aspect ratio kept, centred on white: one token count for every image."""
    from PIL import Image

    width, height = image.size
    scale = min(size[0] / width, size[1] / height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", size, LETTERBOX_FILL)
    canvas.paste(image.resize(inner, Image.Resampling.BICUBIC), ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2))
    return canvas


def encode_image(image, lossy_source: bool) -> bytes:
    """A JPEG stays JPEG (PNG would be ~5× larger and slower for no fidelity it ever had); all else is PNG."""
    buffer = io.BytesIO()
    if lossy_source:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def clean_image(value: Any, rules: ImageRules, base_dir: str | None = None) -> tuple[dict, int, str]:
    """(datasets Image value, image tokens, pixel digest). Unchanged RGB PNG/JPEG keep their bytes.

    `value` is whatever a dataset's image column holds; a relative path is read under `base_dir`."""
    from PIL import Image

    decoded, raw = decode_image(value, base_dir)
    check_shape(*decoded.size, rules)
    image = to_rgb(decoded)
    size = rules.uniform_size or fitted_size(*image.size, rules)
    if rules.uniform_size:
        image = letterbox(image, size)
    elif image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    unchanged = image is decoded and raw is not None and decoded.format in ("PNG", "JPEG")
    data = raw if unchanged else encode_image(image, lossy_source=decoded.format == "JPEG")
    tokens = rules.tokens(size)
    digest = hashlib.sha256(f"{size}".encode() + image.tobytes()).hexdigest()
    return {"bytes": data, "path": None}, tokens, digest


def prepare_image(data: bytes, rules: ImageRules):
    """Image bytes → the PIL image the model sees, cleaned as the prepare stage cleans (ValueError if unusable)."""
    from PIL import Image

    try:
        cleaned, _, _ = clean_image({"bytes": data, "path": None}, rules)
    except BadImage as error:
        raise ValueError(f"not a usable image ({error.reason})") from None
    image = Image.open(io.BytesIO(cleaned["bytes"]))
    image.load()
    return image
