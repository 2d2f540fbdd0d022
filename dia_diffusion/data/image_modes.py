"""Any image PIL opens, as the 8-bit grey or RGB image the model sees, with what its pixel values mean kept.

PIL's `convert("L")` clips pixel types wider than 8 bits at 255 instead of rescaling them, so a 16-bit PNG (mode
"I;16", values 0-65535) would become an almost white image. Here every mode is read in its own range:

- 8-bit modes ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB") convert as PIL converts them (to grey
  through RGB where PIL has no direct conversion, as for "LAB");
- 16-bit modes ("I;16", "I;16B", "I;16L", "I;16N") span 0-65535, and so does "I" (32-bit integers), the mode
  Pillow opens 16-bit PGM/PPM files in (rescaled to 0-65535 whatever their maxval); a value v becomes
  round(v / 257), which maps every 8-bit value stored as v · 257 back to itself;
- "F" (32-bit float, e.g. a float TIFF) spans 0-1, torchvision's convention for float images;
- transparent pixels are composited over black (colour × alpha), so the colour stored under a fully transparent
  pixel, which no viewer shows, never reaches the model; opaque pixels keep their colour exactly;
- pixel values outside their mode's range, and a mode PIL cannot convert to RGB, raise UnsupportedImageError.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

SIXTEEN_BIT_MAX = 65535
# The largest value of each mode wider than 8 bits; every one of them starts at 0.
WIDE_MODE_MAX = {
    "I;16": SIXTEEN_BIT_MAX,
    "I;16B": SIXTEEN_BIT_MAX,
    "I;16L": SIXTEEN_BIT_MAX,
    "I;16N": SIXTEEN_BIT_MAX,
    "I": SIXTEEN_BIT_MAX,
    "F": 1.0,
}
# Modes whose colour bands are stored multiplied by alpha already, i.e. composited over black.
PREMULTIPLIED_MODES = ("La", "RGBa")
GREY_MODES = frozenset({"1", "L", "LA", "La", *WIDE_MODE_MAX})


class UnsupportedImageError(ValueError):
    """An image whose mode or pixel values have no defined 8-bit meaning; the message completes "image X ..."."""


def model_image(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """`image` as mode "L" (channels 1) or "RGB" (channels 3), 8 bits per channel, values kept in their range."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target and not image.has_transparency_data:
        return image
    if image.mode in WIDE_MODE_MAX:
        image = eight_bit(image)
    elif image.has_transparency_data:
        image = over_black(image)
    try:
        try:
            return image.convert(target)
        except ValueError:
            return image.convert("RGB").convert(target)
    except ValueError as error:
        raise UnsupportedImageError(
            f"has PIL mode {image.mode!r}, which PIL cannot convert to {target} ({error}); save it as RGB"
        ) from None


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit "L", rescaled from its mode's range."""
    largest = WIDE_MODE_MAX[image.mode]
    values = np.asarray(image, dtype=np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= largest):
        raise UnsupportedImageError(
            f"has PIL mode {image.mode!r} with pixel values from {values.min():g} to {values.max():g}, outside "
            f"the 0-{largest:g} that mode is read in; save it as an 8- or 16-bit PNG"
        )
    return PIL.Image.fromarray(np.round(values * (255 / largest)).astype(np.uint8))


def over_black(image: PIL.Image.Image) -> PIL.Image.Image:
    """An image with transparency composited over black: "L" for grey + alpha, else "RGB"."""
    premultiplied = image if image.mode in PREMULTIPLIED_MODES else image.convert("RGBA").convert("RGBa")
    colour = premultiplied.split()[:-1]
    return colour[0] if len(colour) == 1 else PIL.Image.merge("RGB", colour)
