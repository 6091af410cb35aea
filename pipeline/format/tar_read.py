"""Tar members as this format allows them, read strictly: the one walk over a shard's
headers that the loader, the validator and the header reader share.

Every header must carry the ``ustar`` magic and a correct checksum; numeric fields must be
octal digits (or GNU base-256, positive); a member must not run past the end. Long names
come from pax ``path`` records or GNU long-name members, sizes from pax ``size`` records,
as ``tarfile`` reads them. What does not follow these rules is a :class:`ShardFormatError`
naming the shard and the byte offset of the header. Member names are checked by
:func:`member_key`, the one rule for what a sample key may hold.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.errors import ShardFormatError, quoted

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)  # two of them end an archive
REGULAR = (ord("0"), 0)  # "0", and NUL as old tars write it
PAX, PAX_GLOBAL, GNU_LONG_NAME, GNU_LONG_LINK = ord("x"), ord("g"), ord("L"), ord("K")
_METADATA = (PAX, PAX_GLOBAL, GNU_LONG_NAME, GNU_LONG_LINK)
MAX_METADATA_BYTES = 1 << 20  # a pax or GNU long-name record (a name is far shorter)
_FIELDS = struct.Struct("100s24x12s12x8sc100x5s83x155s12x")  # name, size, checksum, type, magic, prefix
# <key>.<extension>: the key has no dot, slash, backslash, NUL or space (nothing a path could
# use to leave its directory), the extension is dot-separated words (``labels.msgpack``)
_MEMBER = re.compile(r"(?P<key>[A-Za-z0-9_-]{1,128})\.(?P<ext>[A-Za-z0-9_]{1,32}(?:\.[A-Za-z0-9_]{1,32}){0,3})")
KEY_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def member_key(name: str, where: str) -> tuple[str, str]:
    """``(key, extension)`` of a sample member's name: ``<key>.<extension>`` with a key of 1 to
    128 characters from ``[A-Za-z0-9_-]`` and an extension of up to four dot-separated words
    (``docs/shard-format.md``). Anything else (``../x``, ``/abs``, a NUL, no extension) is a
    ShardFormatError naming ``where``."""
    match = _MEMBER.fullmatch(name)
    if match is None:
        raise ShardFormatError(f"{where}: member {quoted(name)}: expected a name <key>.<extension> (key: 1-128 "
                               "characters of A-Z a-z 0-9 _ -; extension: words of A-Z a-z 0-9 _ joined by '.')")
    return match["key"], match["ext"]


def read_number(field: bytes, what: str, where: str) -> int:
    """A tar header's numeric field, as ``tarfile`` reads it (octal digits up to the first NUL,
    spaces around them; or GNU base-256 with the top bit set), but strict: a sign, an
    underscore, a non-octal digit or a negative base-256 number is an error."""
    if field and field[0] & 0x80:
        if field[0] != 0x80:
            raise ShardFormatError(f"{where}: {what}: expected a non-negative number, found base-256 bytes "
                                   f"{quoted(field)}")
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.isdigit():  # ASCII 0-9 only: no sign, underscore or prefix that int() would take
        try:
            return int(digits, 8)
        except ValueError:
            pass  # an 8 or a 9
    elif not digits:
        return 0
    raise ShardFormatError(f"{where}: {what}: expected octal digits, found {quoted(field)}")


def check_checksum(header: bytes, field: bytes, where: str) -> None:
    """The header's checksum ``field`` must equal the sum of its bytes, the field itself
    counted as spaces (unsigned or signed, as ``tarfile`` accepts)."""
    found = read_number(field, "checksum", where)
    unsigned = 256 + sum(header) - sum(field)
    if found != unsigned:
        signed = 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
        if found != signed:
            raise ShardFormatError(f"{where}: bad header checksum: expected {unsigned}, found {found}")


@dataclass(frozen=True)
class Member:
    """One member: its full name, where its data starts and how long it is, its type flag,
    and where its header starts (for messages)."""

    name: str
    start: int
    size: int
    typeflag: int
    header_at: int

    @property
    def regular(self) -> bool:
        return self.typeflag in REGULAR


def _name(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardFormatError(f"{where}: expected a UTF-8 member name, found {quoted(raw)}") from e


def read_tar_header(buf: bytes, pos: int, url: str) -> tuple[bytes, int, int]:
    """``(name field, size, typeflag)`` of the ustar header block at ``pos``, checked."""
    header = bytes(buf[pos:pos + BLOCK])
    if len(header) < BLOCK:
        raise ShardFormatError(f"{url}: tar header at byte {pos}: truncated: expected {BLOCK} bytes, "
                               f"found {len(header)}")
    name, size_field, checksum, typeflag, magic, prefix = _FIELDS.unpack(header)
    if magic != b"ustar":
        raise ShardFormatError(f"{url}: tar header at byte {pos}: expected a ustar header, found corrupt data")
    check_checksum(header, checksum, f"{url}: tar header at byte {pos}")
    size = read_number(size_field, "size", f"{url}: tar header at byte {pos}")
    name = name.split(b"\0", 1)[0]
    prefix = prefix.split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name), size, typeflag[0]


def pax_records(data: bytes, where: str) -> dict[bytes, bytes]:
    """The ``key=value`` records of a pax extended header (``"%d %s=%s\\n"`` each)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 21)
        length_field = data[pos:space] if space > pos else b""
        if not length_field.isdigit():
            raise ShardFormatError(f"{where}: pax record at {pos}: expected '<length> <key>=<value>\\n', found "
                                   f"{quoted(data[pos:pos + 40])}")
        end = pos + int(length_field)
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if end > len(data) or end <= space or data[end - 1:end] != b"\n" or not eq:
            raise ShardFormatError(f"{where}: pax record at {pos}: length {int(length_field)} does not end a "
                                   "'<key>=<value>\\n' record")
        records[key] = value
        pos = end
    return records


def iter_members(buf: bytes, url: str) -> Iterator[Member]:
    """Every member of the tar in ``buf`` but pax and GNU metadata members (their names and
    sizes applied to the member they precede), in order, up to the end-of-archive marker."""
    end, pos = len(buf), 0
    long_name: str | None = None
    pax_size: int | None = None
    while pos + BLOCK <= end:
        if buf[pos] == 0 and buf[pos:pos + BLOCK] == ZERO_BLOCK:
            return
        raw_name, size, typeflag = read_tar_header(buf, pos, url)
        where = f"{url}: tar header at byte {pos}"
        size = size if pax_size is None else pax_size
        start = pos + BLOCK
        if size > end - start:
            raise ShardFormatError(f"{where}: member {quoted(raw_name.decode(errors='replace'))}: truncated: "
                                   f"expected {size} bytes, found {end - start}")
        member = Member(long_name if long_name is not None else _name(raw_name, where), start, size, typeflag, pos)
        pos = start + -(-size // BLOCK) * BLOCK
        long_name, pax_size = None, None
        if typeflag in _METADATA:
            if size > MAX_METADATA_BYTES:
                raise ShardFormatError(f"{where}: a {chr(typeflag)!r} metadata member of {size} bytes; expected at "
                                       f"most {MAX_METADATA_BYTES}")
            long_name, pax_size = _metadata(bytes(buf[start:start + size]), typeflag, where)
            continue
        yield member
    raise ShardFormatError(f"{url}: missing end-of-archive marker after byte {pos}: the shard is truncated")


def _metadata(data: bytes, typeflag: int, where: str) -> tuple[str | None, int | None]:
    """The name and size that a pax or GNU long-name member gives the next member."""
    if typeflag == GNU_LONG_NAME:
        return _name(data.split(b"\0", 1)[0], where), None
    if typeflag != PAX:  # a global pax header or a long link name: nothing this format uses
        return None, None
    records = pax_records(data, where)
    size = records.get(b"size")
    if size is not None and not (size.isdigit() and size.isascii()):
        raise ShardFormatError(f"{where}: pax size: expected decimal digits, found {quoted(size)}")
    path = records.get(b"path")
    return (None if path is None else _name(path, where)), (None if size is None else int(size))
