"""The embedded demo data set: rendered document pages with six field classes.

``write_demo_data(cfg)`` writes ``data/anchor`` (clean pages from several layout templates, split
train | val | test), ``data/pool`` (human-verified reported failures) and ``data/inbox`` (unreviewed
reports). The reported failures come from a layout template the anchor never shows, scanned under
poor conditions (rotation, low contrast, blur, noise): a realistic shift that a base model trained
on the anchor handles badly and that a short fine-tune can fix.

Everything is deterministic: each page draws from its own ``numpy.random.default_rng`` seeded by
(seed, set, index), fonts are the DejaVu files shipped with matplotlib, JPEGs carry no metadata, so
two calls write byte-identical trees and changing one count leaves every other page unchanged.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import manifest_line, sha256_bytes, split_for
from detloop.data.store import TIME_FORMAT

logger = logging.getLogger(__name__)

CLASSES = ("title", "date", "amount", "signature", "stamp", "table")
TITLE, DATE, AMOUNT, SIGNATURE, STAMP, TABLE = range(len(CLASSES))
ANCHOR_SPLITS = ("train", "val", "test")
IGNORED_NAMES = frozenset({".gitignore", ".dvcignore"})  # kept when data/ is replaced, never compared
IGNORED_SUFFIXES = (".cache",)  # Ultralytics label caches
REVIEWERS = ("a.chen", "m.okafor", "s.ivanova")

RGB = tuple[int, int, int]
Files = dict[str, bytes]  # relative path (posix) -> file bytes


# ----------------------------------------------------------------------------------------- drawing
@cache
def _font(size: int, bold: bool = False, family: str = "Sans") -> ImageFont.FreeTypeFont:
    """A DejaVu font (family Sans, SansMono or Serif) shipped with matplotlib (pinned, so rendering
    is the same everywhere)."""
    import matplotlib

    name = f"DejaVu{family}" + ("-Bold" if bold else "") + ".ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


@dataclass
class Page:
    """A page being drawn, and the labelled objects on it (each as the points that outline it)."""

    image: Image.Image
    rng: np.random.Generator
    objects: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.draw = ImageDraw.Draw(self.image)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def add(self, cls: int, points: Iterable[Iterable[float]]) -> None:
        self.objects.append((cls, np.asarray(list(points), dtype=np.float64).reshape(-1, 2)))

    def add_box(self, cls: int, x0: float, y0: float, x1: float, y1: float) -> None:
        self.add(cls, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def integer(self, low: int, high: int) -> int:
        """A random int in [low, high] (both included)."""
        return int(self.rng.integers(low, high + 1))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]


def _ink(page: Page, low: int = 0, high: int = 40) -> RGB:
    v = page.integer(low, high)
    return (v, v, v + page.integer(0, 10))


def _text(page: Page, xy: tuple[float, float], text: str, font, fill: RGB, anchor: str = "la") -> tuple:
    page.draw.text(xy, text, font=font, fill=fill, anchor=anchor)
    return page.draw.textbbox(xy, text, font=font, anchor=anchor)


def _fit_font(text: str, size: int, max_width: float, bold: bool = True, family: str = "Sans"):
    while size > 8 and _font(size, bold, family).getlength(text) > max_width:
        size -= 1
    return _font(size, bold, family)


def _words(page: Page, n: int) -> str:
    return " ".join("".join(page.pick("abcdefghijklmnoprstuvw") for _ in range(page.integer(2, 8))) for _ in range(n))


def _date_text(page: Page) -> tuple[str, str, str]:
    return f"{page.integer(1, 28):02d}", f"{page.integer(1, 12):02d}", f"{page.integer(2019, 2025)}"


def _amount_text(page: Page) -> str:
    value = page.integer(1, 99999) + page.integer(0, 99) / 100
    currency = page.pick(("$", "EUR", "GBP", "$", "CHF"))
    return f"{currency} {value:,.2f}"


# ----------------------------------------------------------------------------------------- fields
TITLE_WORDS = {
    "form": ("APPLICATION FORM", "CLAIM FORM", "REGISTRATION", "TAX FORM", "REQUEST FORM", "ORDER FORM"),
    "invoice": ("INVOICE", "TAX INVOICE", "BILL", "PRO FORMA", "CREDIT NOTE"),
    "receipt": ("RECEIPT", "CASH RECEIPT", "SALES RECEIPT", "PAYMENT", "TICKET"),
    "delivery_note": ("DELIVERY NOTE", "PACKING SLIP", "SHIPMENT", "WAYBILL", "DISPATCH NOTE"),
}


def draw_title(
    page: Page,
    x: float,
    y: float,
    text: str,
    size: int,
    max_width: float,
    fill: RGB = (0, 0, 0),
    align: str = "l",
    family: str = "Sans",
) -> tuple:
    """A big bold text line; ``align`` l/m/r places ``x`` at its left, middle or right."""
    font = _fit_font(text, size, max_width, family=family)
    box = _text(page, (x, y), text, font, fill, anchor=f"{align}t")
    page.add_box(TITLE, box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1)
    return box


def draw_date(page: Page, x: float, y: float, style: str = "comb", label: str = "above") -> tuple:
    """A date field: 'comb' = boxed day | month | year cells; 'boxed' = mono digits in one box."""
    day, month, year = _date_text(page)
    small = _font(page.integer(7, 8))
    ink = _ink(page)
    if style == "comb":
        font = _font(page.integer(10, 12))
        cell = page.integer(15, 19)
        h = page.integer(16, 20)
        widths = (cell, cell, int(cell * 1.8))
        x1, y1 = x + sum(widths), y + h
        page.draw.rectangle((x, y, x1, y1), outline=ink, width=1)
        cx = x
        for width, part in zip(widths, (day, month, year), strict=True):
            if cx > x:
                page.draw.line((cx, y + 3, cx, y1), fill=ink, width=1)
            page.draw.text((cx + width / 2, y + h / 2 + 1), part, font=font, fill=ink, anchor="mm")
            cx += width
        box = (x, y, x1, y1)
    else:  # boxed
        font = _font(page.integer(10, 12), family="SansMono")
        text = f"{year}-{month}-{day}" if page.chance(0.5) else f"{day}.{month}.{year}"
        w, h = int(font.getlength(text)) + page.integer(8, 14), page.integer(16, 20)
        box = (x, y, x + w, y + h)
        page.draw.rectangle(box, outline=ink, width=1)
        page.draw.text((x + w / 2, y + h / 2 + 1), text, font=font, fill=ink, anchor="mm")
    word = page.pick(("DATE", "Date", "Date:"))
    if label == "above":
        _text(page, (box[0], box[1] - 2), word, small, _ink(page, 40, 90), anchor="lb")
    else:
        _text(page, (box[0] - 4, (box[1] + box[3]) / 2), word, small, _ink(page, 40, 90), anchor="rm")
    page.add_box(DATE, *box)
    return box


def draw_amount(page: Page, x: float, y: float, style: str = "shaded", align: str = "l") -> tuple:
    """An amount field: 'shaded' = grey box with a bold figure; 'double' = double-ruled white box."""
    text = _amount_text(page)
    ink = _ink(page)
    font = _font(page.integer(11, 13), bold=True, family="SansMono" if style == "double" else "Sans")
    w = int(font.getlength(text)) + page.integer(10, 24)
    h = page.integer(17, 22)
    if align == "r":
        x = x - w
    box = (x, y, x + w, y + h)
    if style == "shaded":
        shade = page.integer(195, 225)
        page.draw.rectangle(box, fill=(shade, shade, shade - page.integer(0, 12)), outline=ink, width=1)
    else:  # double
        page.draw.rectangle(box, outline=ink, width=1)
        page.draw.rectangle((x + 2, y + 2, x + w - 2, y + h - 2), outline=ink, width=1)
    page.draw.text((x + w - 5, y + h / 2 + 1), text, font=font, fill=ink, anchor="rm")
    small = _font(page.integer(7, 9), bold=page.chance(0.5))
    _text(page, (x - 4, y + h / 2), page.pick(("TOTAL", "Total", "Amount due", "Sum")), small, ink, "rm")
    page.add_box(AMOUNT, *box)
    return box


def draw_signature(page: Page, x: float, y: float, w: float, h: float, ink: RGB | None = None) -> tuple:
    """A cursive scribble over a signature line; the box is the bounds of the stroke."""
    n = 80
    t = np.linspace(0.0, 1.0, n)
    loops = page.integer(3, 7)
    radius = page.uniform(0.15, 0.35) * h
    xs = x + w * t + radius * 0.8 * np.cos(2 * np.pi * loops * t + page.uniform(0, 6.28))
    ys = y + h / 2 + radius * np.sin(2 * np.pi * loops * t + page.uniform(0, 6.28))
    ys += (h / 2 - radius) * 0.8 * np.sin(2 * np.pi * page.uniform(0.4, 1.4) * t + page.uniform(0, 6.28))
    xs = np.clip(xs, x, x + w)
    ys = np.clip(ys, y, y + h)
    ink = ink or page.pick(((20, 30, 120), (15, 15, 25), (30, 50, 150)))
    width = page.integer(1, 2)
    page.draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=ink, width=width, joint="curve")
    base = y + h + page.integer(2, 5)
    page.draw.line((x - 4, base, x + w + 4, base), fill=_ink(page, 60, 120), width=1)
    _text(
        page,
        (x, base + 2),
        page.pick(("Signature", "Signed", "Authorised by")),
        _font(7),
        _ink(page, 60, 110),
        anchor="lt",
    )
    points = np.stack([xs, ys], axis=1)
    lo, hi = points.min(axis=0) - width, points.max(axis=0) + width
    page.add_box(SIGNATURE, lo[0], lo[1], hi[0], hi[1])
    return (*lo, *hi)


def draw_stamp(page: Page, cx: float, cy: float, d: int, colour: RGB, double: bool = False) -> tuple:
    """A coloured rubber-stamp ring with a word in it, slightly turned and semi-transparent."""
    layer = Image.new("RGBA", (d + 2, d + 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    alpha = page.integer(170, 235)
    ink = (*colour, alpha)
    draw.ellipse((1, 1, d, d), outline=ink, width=3)
    inset = page.integer(5, 7)
    if double or page.chance(0.5):
        draw.ellipse((1 + inset, 1 + inset, d - inset, d - inset), outline=ink, width=1)
    word = page.pick(("PAID", "OK", "APPROVED", "RECEIVED", "COPY", "VOID", "CHECKED"))
    font = _fit_font(word, 12, d - 2 * inset - 4)
    draw.text(((d + 2) / 2, (d + 2) / 2), word, font=font, fill=ink, anchor="mm")
    if page.chance(0.6):
        draw.line((inset + 4, d * 0.68, d - inset - 4, d * 0.68), fill=ink, width=1)
    layer = layer.rotate(page.uniform(-35, 35), resample=Image.Resampling.BICUBIC)
    x0, y0 = int(round(cx - d / 2)), int(round(cy - d / 2))
    page.image.paste(layer, (x0, y0), layer)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = d / 2
    page.add(STAMP, np.stack([x0 + 1 + r + r * np.cos(angles), y0 + 1 + r + r * np.sin(angles)], axis=1))
    return (x0, y0, x0 + d + 2, y0 + d + 2)


def draw_table(page: Page, x: float, y: float, w: float, h: float, style: str = "grid") -> tuple:
    """A table: 'grid' = full cell grid with a shaded header; 'rules' = zebra rows, horizontal rules only."""
    rows, cols = page.integer(3, 7), page.integer(2, 4)
    ink = _ink(page, 0, 60)
    row_h = h / rows
    weights = page.rng.uniform(0.6, 1.6, cols)
    edges = x + np.concatenate([[0.0], np.cumsum(weights) / weights.sum()]) * w
    header = page.integer(190, 225)
    zebra = page.integer(225, 240)
    for r in range(rows):
        top = y + r * row_h
        if r == 0:
            page.draw.rectangle((x, top, x + w, top + row_h), fill=(header, header, header + 5))
        elif style == "rules" and r % 2 == 0:
            page.draw.rectangle((x, top, x + w, top + row_h), fill=(zebra, zebra, zebra - 6))
    font = _font(7, bold=False)
    for r in range(rows):
        for c in range(cols):
            text = _words(page, 1)[:6] if r == 0 or c == 0 else f"{page.integer(1, 999)}"
            page.draw.text((edges[c] + 3, y + (r + 0.5) * row_h), text, font=font, fill=ink, anchor="lm")
    if style == "grid":
        for r in range(rows + 1):
            page.draw.line((x, y + r * row_h, x + w, y + r * row_h), fill=ink, width=1)
        for e in edges:
            page.draw.line((e, y, e, y + h), fill=ink, width=1)
    else:  # rules
        page.draw.line((x, y, x + w, y), fill=ink, width=2)
        page.draw.line((x, y + row_h, x + w, y + row_h), fill=ink, width=1)
        page.draw.line((x, y + h, x + w, y + h), fill=ink, width=2)
    page.add_box(TABLE, x, y, x + w, y + h)
    return (x, y, x + w, y + h)


# ------------------------------------------------------------------------------------- distractors
def draw_paragraph(page: Page, x: float, y: float, w: float, lines: int, size: int = 7) -> float:
    """Unlabelled body text (small, grey): the detector must learn a title is more than text."""
    font = _font(size)
    ink = _ink(page, 50, 120)
    for i in range(lines):
        text = _words(page, 12)
        while font.getlength(text) > w * page.uniform(0.6, 1.0) and " " in text:
            text = text.rsplit(" ", 1)[0]
        page.draw.text((x, y + i * (size + 3)), text, font=font, fill=ink)
    return y + lines * (size + 3)


def draw_input_lines(page: Page, x: float, y: float, w: float, lines: int) -> float:
    """Labelled blank form lines ('Name ______')."""
    font = _font(8)
    ink = _ink(page, 30, 90)
    for i in range(lines):
        yy = y + i * 16
        label = page.pick(("Name", "Address", "Phone", "Ref.", "Account", "City", "E-mail"))
        tb = _text(page, (x, yy), label, font, ink, anchor="lt")
        page.draw.line((tb[2] + 4, tb[3] + 1, x + w, tb[3] + 1), fill=ink, width=1)
        if page.chance(0.5):
            _text(page, (tb[2] + 8, yy - 1), _words(page, 2), _font(8), _ink(page, 10, 60), anchor="lt")
    return y + lines * 16


def draw_logo(page: Page, x: float, y: float, s: int) -> None:
    """A filled company mark (square, disc or triangle) and a company name: not a stamp."""
    colour = tuple(int(c) for c in page.rng.integers(20, 200, 3))
    kind = page.integer(0, 2)
    if kind == 0:
        page.draw.rectangle((x, y, x + s, y + s), fill=colour)
    elif kind == 1:
        page.draw.ellipse((x, y, x + s, y + s), fill=colour)
    else:
        page.draw.polygon([(x, y + s), (x + s / 2, y), (x + s, y + s)], fill=colour)
    _text(page, (x + s + 4, y + s / 2), _words(page, 1).upper()[:9], _font(9, bold=True), _ink(page), "lm")


# --------------------------------------------------------------------------------------- templates
def _paper(width: int, height: int, rng: np.random.Generator, tint: bool = False) -> Image.Image:
    v = int(rng.integers(238, 256))
    colour = (v, v - int(rng.integers(0, 14)), v - int(rng.integers(10, 34))) if tint else (v, v, v)
    return Image.new("RGB", (width, height), colour)


def template_form(page: Page) -> None:
    """Form: title top-left, date top-right, blank lines, grid table, amount, signature, stamp."""
    w, h = page.size
    m = page.integer(10, 18)
    date_x, title_x = w - m - page.integer(72, 82), m + page.integer(0, 8)
    title = draw_title(
        page, title_x, page.integer(10, 20), page.pick(TITLE_WORDS["form"]), page.integer(18, 22), date_x - title_x - 10
    )
    y = draw_paragraph(page, m, title[3] + page.integer(5, 9), w * 0.55, page.integer(1, 3))
    if page.chance(0.9):
        draw_date(page, date_x, page.integer(26, 40), "comb", "above")
    y = draw_input_lines(page, m, max(y, 64) + page.integer(4, 10), w - 2 * m, page.integer(1, 3))
    table_bottom = y
    if page.chance(0.9):
        th = page.integer(55, 95)
        tw = w - 2 * m - page.integer(0, 50)
        draw_table(page, m, y + page.integer(6, 12), tw, th, "grid")
        table_bottom = y + 12 + th
    if page.chance(0.85):
        draw_amount(page, w - m, table_bottom + page.integer(8, 16), "shaded", align="r")
    bottom = h - page.integer(34, 50)
    if page.chance(0.85):
        sw, sh = page.integer(70, 100), page.integer(22, 32)
        draw_signature(page, m + page.integer(4, 20), bottom - 10, sw, sh)
    if page.chance(0.7):
        d = page.integer(44, 60)
        draw_stamp(
            page,
            w - m - d / 2 - page.integer(0, 40),
            bottom + page.integer(-12, 8),
            d,
            page.pick(((200, 30, 30), (30, 60, 180))),
        )


def template_invoice(page: Page) -> None:
    """Invoice: logo top-left, title top-right, address, wide table, amount, stamp left, signature right."""
    w, h = page.size
    m = page.integer(10, 16)
    draw_logo(page, m, page.integer(10, 18), page.integer(18, 26))
    title = draw_title(
        page, w - m, page.integer(12, 22), page.pick(TITLE_WORDS["invoice"]), page.integer(19, 24), w * 0.5, align="r"
    )
    draw_paragraph(page, m, page.integer(44, 52), w * 0.45, page.integer(2, 4))
    if page.chance(0.9):
        draw_date(page, w - m - page.integer(72, 80), title[3] + page.integer(14, 22), "comb", "left")
    y = page.integer(96, 112)
    if page.chance(0.9):
        th = page.integer(70, 120)
        draw_table(page, m, y, w - 2 * m, th, "grid")
        y += th
    if page.chance(0.85):
        draw_amount(page, w - m, y + page.integer(8, 14), "shaded", align="r")
    bottom = h - page.integer(36, 48)
    if page.chance(0.7):
        d = page.integer(46, 62)
        draw_stamp(
            page,
            m + d / 2 + page.integer(0, 30),
            bottom - page.integer(0, 14),
            d,
            page.pick(((200, 30, 30), (30, 60, 180), (200, 30, 30))),
        )
    if page.chance(0.85):
        sw = page.integer(70, 96)
        draw_signature(page, w - m - sw - page.integer(0, 12), bottom - 6, sw, page.integer(22, 30))
    draw_paragraph(page, m, h - 12, w - 2 * m, 1, size=6)


def template_receipt(page: Page) -> None:
    """Receipt: a paper strip on a desk; centred title, date, item grid, amount, optional stamp/signature."""
    w, h = page.size
    desk = tuple(int(c) for c in page.rng.integers(70, 170, 3))
    page.draw.rectangle((0, 0, w, h), fill=desk)
    pw = page.integer(160, 196)
    px = (w - pw) // 2 + page.integer(-18, 18)
    top, bottom = page.integer(4, 14), h - page.integer(4, 14)
    v = page.integer(236, 255)
    page.draw.rectangle((px, top, px + pw, bottom), fill=(v, v, v - page.integer(0, 10)))
    cx = px + pw / 2
    title = draw_title(
        page, cx, top + page.integer(8, 14), page.pick(TITLE_WORDS["receipt"]), page.integer(16, 20), pw - 16, align="m"
    )
    y = draw_paragraph(page, px + 10, title[3] + 5, pw - 20, page.integer(1, 2))
    if page.chance(0.9):
        draw_date(page, px + page.integer(40, pw - 90), y + 16, "comb", "left")
    y += 44
    page.draw.line((px + 6, y - 6, px + pw - 6, y - 6), fill=_ink(page, 60, 140), width=1)
    if page.chance(0.9):
        th = page.integer(60, 100)
        draw_table(page, px + 8, y, pw - 16, th, "grid")
        y += th
    if page.chance(0.85):
        draw_amount(page, px + pw - 8, y + page.integer(8, 14), "shaded", align="r")
    y += 44
    if page.chance(0.6) and bottom - y > 40:
        sw = min(page.integer(60, 90), pw - 30)
        draw_signature(page, px + 12, min(y + 4, bottom - 36), sw, page.integer(18, 24))
    if page.chance(0.6):
        d = page.integer(40, 54)
        draw_stamp(
            page,
            px + pw - d / 2 - page.integer(4, 20),
            y - page.integer(10, 40),
            d,
            page.pick(((200, 30, 30), (30, 60, 180))),
        )


def template_delivery_note(page: Page) -> None:
    """The reported-failure layout: centred title over a heavy rule, date beside the sender block,
    ruled zebra table, double-ruled mono amount, green or violet stamp, 'received by' signature."""
    w, h = page.size
    m = page.integer(12, 18)
    ink = (page.integer(10, 40), page.integer(10, 40), page.integer(30, 80))
    title = draw_title(
        page,
        w / 2 + page.integer(-16, 16),
        page.integer(10, 18),
        page.pick(TITLE_WORDS["delivery_note"]),
        page.integer(18, 22),
        w - 2 * m,
        fill=ink,
        align="m",
    )
    rule = title[3] + page.integer(4, 7)
    page.draw.line((m, rule, w - m, rule), fill=ink, width=page.integer(2, 3))
    y = rule + page.integer(8, 14)
    draw_paragraph(page, m, y, w * 0.42, page.integer(2, 4))
    if page.chance(0.9):
        draw_date(page, w - m - page.integer(86, 96), y + page.integer(2, 10), "comb", "left")
    y += page.integer(50, 60)
    if page.chance(0.9):
        th = page.integer(70, 110)
        draw_table(page, m, y, w - 2 * m - page.integer(0, 30), th, "rules")
        y += th
    if page.chance(0.85):
        draw_amount(page, w - m, y + page.integer(10, 16), "double", align="r")
    bottom = h - page.integer(30, 40)
    if page.chance(0.85):
        sw = page.integer(70, 100)
        sx = w - m - sw - page.integer(0, 30)
        _text(page, (sx - 6, bottom), "Received by:", _font(7), _ink(page, 60, 110), "rm")
        draw_signature(page, sx, bottom - 14, sw, page.integer(20, 28), ink=(15, 15, 25))
    if page.chance(0.75):
        d = page.integer(42, 58)
        draw_stamp(
            page,
            m + d / 2 + page.integer(0, 20),
            bottom - page.integer(20, 40),
            d,
            page.pick(((30, 140, 60), (120, 40, 150))),
            double=True,
        )


TEMPLATES: dict[str, Callable[[Page], None]] = {
    "form": template_form,
    "invoice": template_invoice,
    "receipt": template_receipt,
    "delivery_note": template_delivery_note,
}


# ------------------------------------------------------------------------------------------- scan
def _rotate_points(points: np.ndarray, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """Where points land after ``Image.rotate(angle_deg)`` (counter-clockwise) about (cx, cy)."""
    a = np.deg2rad(angle_deg)
    dx, dy = points[:, 0] - cx, points[:, 1] - cy
    return np.stack([cx + dx * np.cos(a) + dy * np.sin(a), cy - dx * np.sin(a) + dy * np.cos(a)], axis=1)


def scan(page: Page, scan_cfg: Mapping) -> None:
    """Degrade a page like a poor scan: small rotation, faded low-contrast print, blur and noise."""
    w, h = page.size
    rng = page.rng
    angle = float(rng.uniform(-1, 1)) * float(scan_cfg["rotation"])
    bed = int(rng.integers(30, 90))
    image = page.image.rotate(
        angle, resample=Image.Resampling.BICUBIC, center=(w / 2, h / 2), fillcolor=(bed, bed, bed)
    )
    page.objects = [(cls, _rotate_points(pts, angle, w / 2, h / 2)) for cls, pts in page.objects]
    pixels = np.asarray(image, dtype=np.float32)
    contrast = float(rng.uniform(*scan_cfg["contrast"]))
    paper = float(rng.uniform(215, 245))
    pixels = paper - (255.0 - pixels) * contrast  # faded print: ink turns grey, paper stays light
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(*scan_cfg["blur"]))))
    pixels = np.asarray(image, dtype=np.float32)
    sigma = float(rng.uniform(*scan_cfg["noise"]))
    pixels += rng.normal(0.0, sigma, (h, w, 1)).astype(np.float32)
    pixels += rng.normal(0.0, sigma / 3, (h, w, 3)).astype(np.float32)
    page.image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    image: bytes
    labels: bytes
    template: str
    counts: tuple[int, ...]


def _rng(seed: int, tag: str, index: int) -> np.random.Generator:
    """The generator of one page: seeded by (seed, set/split, index), so counts can change freely."""
    return np.random.default_rng([int(seed), zlib.crc32(tag.encode("utf-8")), int(index)])


def _yolo_labels(page: Page) -> tuple[bytes, tuple[int, ...]]:
    """YOLO txt lines (cls xc yc w h, normalized, 6 decimals), each box the bounds of its points."""
    w, h = page.size
    lines, counts = [], [0] * len(CLASSES)
    for cls, points in page.objects:
        x0, y0 = np.clip(points.min(axis=0), 0, (w, h))
        x1, y1 = np.clip(points.max(axis=0), 0, (w, h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        lines.append(f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
        counts[cls] += 1
    return "".join(lines).encode("ascii"), tuple(counts)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality), optimize=False, progressive=False)
    return buffer.getvalue()


def render_sample(demo: DictConfig, tag: str, index: int, template: str, scanned: bool) -> Sample:
    """One page: drawn from ``template``, optionally scanned, encoded as JPEG + YOLO labels."""
    rng = _rng(demo.seed, tag, index)
    page = Page(_paper(int(demo.page.width), int(demo.page.height), rng, tint=scanned), rng)
    TEMPLATES[template](page)
    if scanned:
        scan(page, demo.failures.scan)
    labels, counts = _yolo_labels(page)
    return Sample(_jpeg(page.image, demo.jpeg_quality), labels, template, counts)


# ------------------------------------------------------------------------------------------ layout
def _timestamp(base: datetime, hours: float) -> str:
    return (base + timedelta(seconds=int(round(hours * 3600)))).strftime(TIME_FORMAT)


def _anchor_files(demo: DictConfig, summary: dict) -> Files:
    files: Files = {}
    rows = []
    templates = list(demo.anchor.templates)
    for split in ANCHOR_SPLITS:
        for index in range(int(demo.anchor[split])):
            template = templates[index % len(templates)]  # round robin: every split sees every layout
            sample = render_sample(demo, f"anchor/{split}", index, template, scanned=False)
            sample_id = f"anchor-{split}-{index:05d}"
            files[f"images/{split}/{sample_id}.jpg"] = sample.image
            files[f"labels/{split}/{sample_id}.txt"] = sample.labels
            rows.append(
                {"id": sample_id, "split": split, "sha256": sha256_bytes(sample.image), "source": f"demo:{template}"}
            )
            _count(summary, "anchor", split, sample)
    files["manifest.jsonl"] = "".join(manifest_line(r) for r in rows).encode("utf-8")
    files["data.yaml"] = _data_yaml().encode("utf-8")
    return files


def _failure_files(demo: DictConfig, pool_split: Mapping[str, float], summary: dict) -> tuple[Files, Files]:
    """Reported failures, numbered in report order: the first ``pool`` are verified, the rest wait."""
    failures = demo.failures
    base = datetime.strptime(str(failures.reported_from), TIME_FORMAT)
    pool: Files = {}
    inbox: Files = {}
    pool_rows, inbox_rows = [], []
    n_pool = int(failures.pool)
    for index in range(n_pool + int(failures.inbox)):
        sample = render_sample(demo, "failures", index, str(failures.template), scanned=True)
        rng = _rng(demo.seed, "failures/meta", index)
        sample_id = f"report-{index:05d}"
        every = float(failures.report_every_hours)
        hours = index * every + float(rng.uniform(0, every))
        row = {
            "id": sample_id,
            "sha256": sha256_bytes(sample.image),
            "source": f"demo:{failures.template}+scan",
            "reported_at": _timestamp(base, hours),
        }
        target, rows = (pool, pool_rows) if index < n_pool else (inbox, inbox_rows)
        if index < n_pool:
            row["reviewer"] = REVIEWERS[int(rng.integers(len(REVIEWERS)))]
            row["verified_at"] = _timestamp(base, hours + float(rng.uniform(1, 72)))
            row["split"] = split_for(sample_id, pool_split)
            _count(summary, "pool", row["split"], sample)
        else:
            _count(summary, "inbox", "unreviewed", sample)
        target[f"images/{sample_id}.jpg"] = sample.image
        target[f"labels/{sample_id}.txt"] = sample.labels
        rows.append(row)
    pool["manifest.jsonl"] = "".join(manifest_line(r) for r in pool_rows).encode("utf-8")
    inbox["manifest.jsonl"] = "".join(manifest_line(r) for r in inbox_rows).encode("utf-8")
    return pool, inbox


def _count(summary: dict, dataset: str, split: str, sample: Sample) -> None:
    part = summary.setdefault(dataset, {})
    part[split] = part.get(split, 0) + 1
    objects = summary.setdefault("objects", {}).setdefault(dataset, dict.fromkeys(CLASSES, 0))
    for name, n in zip(CLASSES, sample.counts, strict=True):
        objects[name] += n
    templates = summary.setdefault("templates", {}).setdefault(dataset, {})
    templates[sample.template] = templates.get(sample.template, 0) + 1


def _data_yaml() -> str:
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    return (
        "# Ultralytics dataset yaml of the detloop demo anchor (written by detloop demo-data).\n"
        "# No `path:` key on purpose: Ultralytics then resolves the splits relative to this file\n"
        "# (`path: .` would resolve against the current working directory).\n"
        "train: images/train\nval: images/val\ntest: images/test\n"
        f"nc: {len(CLASSES)}\nnames:\n{names}"
    )


# ---------------------------------------------------------------------------------------- writing
def _validate(cfg: DictConfig) -> None:
    demo = cfg.demo
    problems = []
    for key in ("anchor.train", "anchor.val", "anchor.test", "failures.pool", "failures.inbox"):
        value = OmegaConf.select(demo, key)
        if not isinstance(value, int) or value < 0:
            problems.append(f"demo.{key}: expected a non-negative int, got {value!r}")
    for name in [*demo.anchor.templates, demo.failures.template]:
        if name not in TEMPLATES:
            problems.append(f"demo templates: unknown template {name!r} (known: {', '.join(TEMPLATES)})")
    if demo.failures.template in demo.anchor.templates:
        problems.append("demo.failures.template: must be a layout the anchor never shows")
    if not demo.anchor.templates:
        problems.append("demo.anchor.templates: name at least one template")
    for key in ("width", "height"):
        if not 64 <= int(demo.page[key]) <= 4096:
            problems.append(f"demo.page.{key}: expected 64..4096 pixels, got {demo.page[key]}")
    try:
        datetime.strptime(str(demo.failures.reported_from), TIME_FORMAT)
    except ValueError:
        problems.append(f"demo.failures.reported_from: expected {TIME_FORMAT}, got {demo.failures.reported_from}")
    if problems:
        raise BadInput("invalid demo config", problems)


def _targets(cfg: DictConfig, root: Path | None) -> tuple[Path, dict[str, str]]:
    """paths.data and the anchor/pool/inbox folders relative to it (they must lie inside it)."""
    data = resolve_path(cfg, "data", root).resolve()
    relative = {}
    for key in ("anchor", "pool", "inbox"):
        path = resolve_path(cfg, key, root).resolve()
        if not path.is_relative_to(data) or path == data:
            problem = f"paths.{key}={path} must be a folder inside paths.data={data}"
            raise BadInput("demo data layout", [problem])
        relative[key] = path.relative_to(data).as_posix()
    if len(set(relative.values())) != 3:
        raise BadInput("demo data layout", [f"paths.anchor/pool/inbox must differ, got {relative}"])
    return data, relative


def _ignored(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


def _existing_files(folder: Path) -> dict[str, Path]:
    """Files under ``folder`` by posix relative path, leaving out caches and ignore files."""
    found = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            if not _ignored(relative):
                found[relative] = path
    return found


def _differences(existing: Mapping[str, Path], files: Files) -> list[str]:
    """How the files on disk differ from the demo data set (empty: they are the same)."""
    extra = sorted(existing.keys() - files.keys())
    missing = sorted(files.keys() - existing.keys())
    changed = sorted(
        rel
        for rel in existing.keys() & files.keys()
        if existing[rel].stat().st_size != len(files[rel]) or existing[rel].read_bytes() != files[rel]
    )
    return (
        [f"{existing[rel]}: not part of the demo data set" for rel in extra]
        + [f"{existing[rel]}: differs from the demo data set" for rel in changed]
        + [f"{rel}: missing" for rel in missing]
    )


def _write_tree(folder: Path, files: Files) -> None:
    for relative, data in sorted(files.items()):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _replace(data: Path, files: Files) -> None:
    """Write ``files`` into a temp folder beside ``data`` and swap it in (ignore files are kept)."""
    data.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}.demo-tmp-", dir=data.parent))
    try:
        _write_tree(staging, files)
        if data.exists():
            for dirpath, _dirs, names in os.walk(data):
                for name in names:
                    if name in IGNORED_NAMES:
                        source = Path(dirpath) / name
                        target = staging / source.relative_to(data)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source, target)
            retired = Path(tempfile.mkdtemp(prefix=f".{data.name}.demo-old-", dir=data.parent))
            data.rename(retired / data.name)
            staging.rename(data)
            shutil.rmtree(retired)
        else:
            staging.rename(data)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def build_files(cfg: DictConfig, relative: Mapping[str, str]) -> tuple[Files, dict]:
    """Every file of the demo data set (path relative to paths.data -> bytes) and its summary."""
    summary: dict = {"classes": list(CLASSES)}
    anchor = _anchor_files(cfg.demo, summary)
    pool, inbox = _failure_files(cfg.demo, dict(cfg.pool.split), summary)
    files: Files = {}
    for key, part in (("anchor", anchor), ("pool", pool), ("inbox", inbox)):
        files.update({f"{relative[key]}/{rel}": data for rel, data in part.items()})
    summary["files"] = len(files)
    summary["bytes"] = sum(len(b) for b in files.values())
    return files, summary


def write_demo_data(cfg: DictConfig, root: Path | None = None) -> dict:
    """Write the deterministic demo data set into ``paths.data``; return a summary.

    An empty or missing folder is written; a folder that already holds exactly this data set is
    left alone (``changed=False``); anything else raises :class:`BadInput` unless
    ``demo.overwrite=true``, which replaces it. Ultralytics ``*.cache`` files and
    ``.gitignore``/``.dvcignore`` are not compared.
    """
    _validate(cfg)
    data, relative = _targets(cfg, root)
    if data.is_symlink():
        data = data.resolve()
    files, summary = build_files(cfg, relative)
    summary["root"] = str(data)
    if data.exists() and not data.is_dir():
        raise BadInput(f"{data} is a file, not a folder", [f"paths.data={data}"])
    existing = _existing_files(data) if data.is_dir() else {}
    differences = _differences(existing, files) if existing else []
    if existing and not differences:
        summary["changed"] = False
        logger.info("demo data in %s is up to date (%d files)", data, len(files))
        return summary
    if existing and not cfg.demo.overwrite:
        raise BadInput(
            f"{data} already holds other data; pass demo.overwrite=true to replace it (nothing was changed)",
            differences[:5] + ([f"... and {len(differences) - 5} more"] if len(differences) > 5 else []),
        )
    _replace(data, files)
    summary["changed"] = True
    logger.info("wrote demo data to %s: %d files, %.1f MB", data, len(files), summary["bytes"] / 1e6)
    return summary
