"""The inference CLI's images: files, folders and http(s) URLs read into bytes, each failure kept
as that image's error (a bad image is reported for that image; the others carry on).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_S = 20.0
MAX_IMAGE_BYTES = 20 * 2**20  # an image larger than this is not a photo or chart a VL model needs


@dataclass
class ImageSource:
    """One requested image: raw bytes once read, or the reason it could not be."""

    source: str
    data: bytes | None = None
    error: str | None = None



def split_list(values: list[str], paths: bool = False) -> list[str]:
    """Repeated flags and comma lists alike; with `paths`, a value that exists as a path is never split."""
    items = []
    for value in values:
        if paths and os.path.exists(value):
            items.append(value)
        else:
            items += [part.strip() for part in value.split(",") if part.strip()]
    return items



def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Download with a deadline for the whole transfer and a size cap enforced while reading.

    Content-Length is checked first but not trusted: a server may omit or understate it.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "grpo-qwen-vl-infer"})
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked by caller
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"{int(declared)} bytes, over the {max_bytes}-byte limit (--max_image_bytes)")
        chunks, size = [], 0
        while chunk := response.read(1 << 16):
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"more than {max_bytes} bytes, over the limit (--max_image_bytes)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {timeout:g} s (--url_timeout)")
            chunks.append(chunk)
    return b"".join(chunks)



def collect_images(specs: list[str], timeout: float = URL_TIMEOUT_S,
                   max_bytes: int = MAX_IMAGE_BYTES) -> list[ImageSource]:
    """Files, folders (their image files, sorted) and URLs → raw bytes; failures stay in the list."""
    images: list[ImageSource] = []
    for spec in split_list(specs, paths=True):
        if "://" in spec:
            if not spec.lower().startswith(URL_SCHEMES):
                images.append(ImageSource(spec, error="unsupported URL scheme (only http and https)"))
                continue
            try:
                images.append(ImageSource(spec, data=fetch_url(spec, timeout, max_bytes)))
            except urllib.error.HTTPError as error:
                images.append(ImageSource(spec, error=f"download failed: HTTP {error.code} {error.reason}"))
            except urllib.error.URLError as error:
                images.append(ImageSource(spec, error=f"download failed: {error.reason}"))
            except (OSError, ValueError) as error:  # timeouts are OSErrors
                images.append(ImageSource(spec, error=f"download failed: {error}"))
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                images.append(ImageSource(spec, error=f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            images += [_read_file(p, max_bytes) for p in files]
        elif path.is_file():
            images.append(_read_file(path, max_bytes))
        else:
            images.append(ImageSource(spec, error="no such file or folder"))
    return images



def _read_file(path: Path, max_bytes: int) -> ImageSource:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return ImageSource(str(path), error=f"{size} bytes, over the {max_bytes}-byte limit (--max_image_bytes)")
        return ImageSource(str(path), data=path.read_bytes())
    except OSError as error:
        return ImageSource(str(path), error=f"cannot read: {error.strerror or error}")

