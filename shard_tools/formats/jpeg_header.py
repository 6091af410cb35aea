"""Classify a JPEG from its header bytes without Pillow, for the common case only.

:func:`jpeg_header` walks the markers of a JPEG the way Pillow's ``JpegImagePlugin``
opens one (same marker table, same skipping of fill bytes and junk, same checks of the
segments Pillow parses) up to the start of scan, and returns the mode (``"L"``, ``"RGB"``
or ``"CMYK"``: 1, 3 or 4 components of the frame header, as Pillow maps them; YCCK counts
as CMYK) and the size. Whenever Pillow's answer could be anything but "a JPEG of this
mode and size", it returns None and the caller asks Pillow: not a JPEG (PNG and other
signatures), a segment cut short, a length field below 2, a frame header Pillow refuses
(not 8 bits, not 1, 3 or 4 components, a component list that is not whole), a bad
quantization table, a second frame header, an MPF segment (Pillow may open it as MPO),
EXIF that Pillow would parse for a DPI, a Photoshop resource block, a short ICC, JFIF or
Adobe segment, no start of scan in ``data``, a zero side, or more pixels than
``PIL.Image.MAX_IMAGE_PIXELS``. So it never says anything Pillow would not; it only saves
opening the file with Pillow.
"""

from __future__ import annotations

from PIL import Image

__all__ = ["jpeg_header"]

_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
# Markers Pillow reads a segment for; the others (RSTn, SOI, EOI, JPG, JPGn) stand alone.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_SKIP = frozenset((0xC4, 0xCC, 0xDA, 0xDC, 0xDD, 0xDF))
_NO_SEGMENT = frozenset((*range(0xD0, 0xDA), 0xC8, *range(0xF0, 0xFE)))


def jpeg_header(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """``(mode, (width, height))`` of the JPEG whose first bytes are ``data``, exactly as
    ``PIL.Image.open`` would report them; None where Pillow must decide (see the module)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = len(data)
    pos = 2  # Pillow re-reads the third byte as the first 0xFF of a marker
    frame: tuple[str, tuple[int, int]] | None = None
    exif = dpi = False
    while pos < end:
        if data[pos] != 0xFF:
            pos += 1  # junk between segments: Pillow skips it byte by byte
            continue
        if pos + 1 >= end:
            return None  # a lone 0xFF at the end: Pillow stops without a start of scan
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x00:  # escaped 0xFF
            pos += 2
            continue
        if marker in _NO_SEGMENT:
            pos += 2
            continue
        if marker < 0xC0 or marker == 0xDE:  # no marker (Pillow: SyntaxError); DHP uses SOF's handler
            return None
        if pos + 4 > end:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        start, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker in _SKIP:
            if marker == 0xDA:
                break
        elif marker in _SOF:
            if frame is not None or length < 8 or (length - 8) % 3 or data[start] != 8:
                return None  # Pillow reads the components 3 bytes at a time: no trailing bytes
            mode = _MODES.get(data[start + 5])
            if mode is None:
                return None
            frame = mode, ((data[start + 3] << 8) | data[start + 4], (data[start + 1] << 8) | data[start + 2])
        elif marker == 0xDB:
            at = start
            while at < pos:
                at += 65 if data[at] < 16 else 129
            if at > pos:
                return None  # bad quantization table marker
        elif marker == 0xFE:
            pass  # comment
        else:  # APP0..APP15
            segment = data[start:pos]
            if marker == 0xE0 and segment.startswith(b"JFIF"):
                if len(segment) < 12:
                    return None
                dpi = dpi or segment[7] in (1, 2)
            elif marker == 0xE1 and segment.startswith(b"Exif\0\0"):
                exif = True
            elif _pillow_decides(marker, segment):
                return None
    else:
        return None  # no start of scan in data
    if frame is None or (exif and not dpi):
        return None
    width, height = frame[1]
    limit = Image.MAX_IMAGE_PIXELS
    if width == 0 or height == 0 or (limit is not None and width * height > limit):
        return None
    return frame


def _pillow_decides(marker: int, segment: bytes) -> bool:
    """An APPn segment whose parsing by Pillow may change the answer: MPF (an MPO file),
    a Photoshop resource block, an ICC chunk too short for its sequence bytes, an Adobe
    segment too short for its version."""
    if marker == 0xE2:
        return segment.startswith(b"MPF\0") or (segment.startswith(b"ICC_PROFILE\0") and len(segment) < 14)
    if marker == 0xED:
        return segment.startswith(b"Photoshop 3.0\x00")
    return marker == 0xEE and segment.startswith(b"Adobe") and len(segment) < 7
