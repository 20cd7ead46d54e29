"""Image parts a router accepts: a web address, or an inline ``data:`` image within the size limit.

An inline image travels inside the request through Kafka to a worker and on to the provider, so
its size is checked once, at the door, with the same answer for HTTP (400) and the Kafka ingress
(dead letter): the limit (``SWITCHBOARD_MAX_IMAGE_BYTES``) counts the decoded image bytes.
"""

from __future__ import annotations

import binascii
import re

from schemas.v1 import ChatRequest, ImagePart

# 3.75 MiB decoded is 5 MiB as base64: within Anthropic's 5 MB image limit (the smallest of the
# providers) whichever of the two forms it counts, so an image accepted here fits every provider.
MAX_IMAGE_BYTES = 5 * 1024 * 1024 * 3 // 4
# The image formats OpenAI, Anthropic and Gemini all accept inline.
FORMATS = ("png", "jpeg", "gif", "webp")
_DATA_URL = re.compile(r"data:image/([a-z0-9.+-]+);base64,", re.IGNORECASE)


class BadImage(ValueError):
    """An image part the router refuses; ``param`` is its path in the request body."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(f"{param}: {message}")
        self.message, self.param, self.code = message, param, code


def decoded_size(payload: str) -> int:
    """Bytes that ``payload`` (base64, without whitespace) decodes to."""
    return len(payload) * 3 // 4 - payload[-2:].count("=")


def check_image(url: str, param: str, max_bytes: int) -> None:
    if url.startswith(("https://", "http://")):
        return
    match = _DATA_URL.match(url)
    if match is None:
        raise BadImage(
            "an image must be an http(s) URL or a data URL ('data:image/<format>;base64,<data>')",
            param,
            "invalid_image_url",
        )
    kind = match.group(1).lower()
    if kind not in FORMATS:
        raise BadImage(
            f"image format {kind!r} is not supported; use one of {', '.join(FORMATS)}",
            param,
            "invalid_image_format",
        )
    payload = url[match.end() :]
    size = decoded_size(payload)
    if size > max_bytes:
        raise BadImage(
            f"inline image of {size} bytes is over the limit of {max_bytes} bytes; "
            "send a smaller image or an https URL",
            param,
            "image_too_large",
        )
    try:
        binascii.a2b_base64(payload, strict_mode=True)
    except binascii.Error as exc:
        message = f"the image data is not valid base64 ({exc})"
        raise BadImage(message, param, "invalid_image_url") from exc


def check_images(request: ChatRequest, max_bytes: int) -> None:
    """Raise ``BadImage`` for the first image part of ``request`` the router refuses."""
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                check_image(
                    part.image_url.url, f"messages[{i}].content[{j}].image_url.url", max_bytes
                )
