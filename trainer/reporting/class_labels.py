"""Class names as figures can draw them: cut to a length, and drawn with a font that has their characters (a
figure whose labels are boxes says which font to install instead).
"""

import dataclasses
import functools
import logging
from typing import Sequence

from matplotlib import font_manager, ft2font, rcParams

# Figures cut longer class names with an ellipsis (the report text keeps them whole).
MAX_LABEL_CHARS = 18

# What to do about a class name no installed font draws, said in one line (figures, TensorBoard descriptions).
FONT_FIX = "Install a font with its characters (e.g. apt-get install fonts-noto-cjk) and rerun."

# Fonts whose glyphs are placeholders (a box naming the Unicode block), not letters.
_PLACEHOLDER_FONTS = ("Last Resort",)

# Drawing with a fallback font of one weight only (WenQuanYi Zen Hei is 500) makes matplotlib warn "Failed to find
# font weight normal ..., now using 500" on every figure: the nearest weight is what a label wants.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


@dataclasses.dataclass(frozen=True)
class Labels:
  """Class names as a figure can draw them: `texts[i]` is class i's name, cut to MAX_LABEL_CHARS, or `#i` (its
  class id, as serving's class_ids) for the classes `by_id`, whose names have a character no installed font has;
  `fonts` are the font families that draw every text (glyph by glyph, the first that has it)."""
  classes: tuple[str, ...]
  texts: tuple[str, ...]
  fonts: tuple[str, ...]
  by_id: tuple[int, ...]

  def note(self) -> str:
    """The line a figure shows under classes it names by id ('' if none), with the fix in a few words."""
    if not self.by_id:
      return ""
    ids = ", ".join(f"#{index}" for index in self.by_id)
    what = ("the class id of a name" if len(self.by_id) == 1 else "class ids of names") + " no installed font draws"
    return f"{ids}: {what} (classification_report.txt names them). {FONT_FIX}"

  def legend(self) -> str:
    """The names of the classes shown by id, as Markdown for a TensorBoard description ('' if none)."""
    if not self.by_id:
      return ""
    return ("Classes shown by id: " + ", ".join(f"#{index} = {self.classes[index]}" for index in self.by_id)
            + ". " + FONT_FIX)


def figure_labels(classes: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> Labels:
  default = rcParams["font.sans-serif"][0]
  texts, fonts, by_id = [], [default], []
  for index, name in enumerate(classes):
    short = shorten(name, max_chars)
    families = _families_drawing(short, default)
    if families is None:
      texts.append(f"#{index}")
      by_id.append(index)
    else:
      texts.append(short)
      fonts += [family for family in families if family not in fonts]
  return Labels(tuple(classes), tuple(texts), tuple(fonts), tuple(by_id))


def shorten(text: str, max_chars: int) -> str:
  return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def _families_drawing(text: str, default: str) -> list[str] | None:
  """Font families that together have a glyph for every character of `text` (besides `default`, which has most),
  or None if no installed font has some character, even after adding the fonts installed since matplotlib's font
  cache was built."""
  missing = {ord(char) for char in text} - _codes_of(font_manager.findfont(default))
  families = _families_with(missing, _charmaps()) if missing else []
  if families is None and _add_fonts_missing_from_the_cache():
    families = _families_with(missing, _charmaps())
  return families


def _families_with(codes: set[int], charmaps: dict[str, frozenset[int]]) -> list[str] | None:
  families = []
  for code in codes:
    family = next((family for family, font_codes in charmaps.items() if code in font_codes), None)
    if family is None:
      return None
    families.append(family)
  return sorted(set(families))


def _charmaps() -> dict[str, frozenset[int]]:
  """The code points of each font family matplotlib knows (its own and the system's), by family name: read only
  for a name the default font cannot draw (reading every font takes a while on a machine with many)."""
  return _charmaps_of(len(font_manager.fontManager.ttflist))


@functools.cache
def _charmaps_of(font_count: int) -> dict[str, frozenset[int]]:
  """`_charmaps` while matplotlib knows `font_count` fonts (read again once fonts are added)."""
  del font_count  # The cache key: the fonts are read from the font manager itself.
  charmaps = {}
  for font in font_manager.fontManager.ttflist:
    if not font.name.startswith(_PLACEHOLDER_FONTS):
      charmaps[font.name] = charmaps.get(font.name, frozenset()) | _codes_of(font.fname)
  return charmaps


@functools.cache
def _add_fonts_missing_from_the_cache() -> bool:
  """Adds to matplotlib's font manager the system's fonts that its cache (~/.cache/matplotlib, built once) does not
  list: a font installed after the cache was built is otherwise never seen. Whether any was added; once a process."""
  known = {font.fname for font in font_manager.fontManager.ttflist}
  added = False
  for path in font_manager.findSystemFonts():
    if path not in known:
      try:
        font_manager.fontManager.addfont(path)
        added = True
      except (OSError, RuntimeError, ValueError):  # A file FreeType cannot read.
        continue
  return added


@functools.cache
def _codes_of(font_file: str) -> frozenset[int]:
  try:
    return frozenset(ft2font.FT2Font(font_file).get_charmap())
  except (OSError, RuntimeError):  # A font file matplotlib listed but FreeType cannot read.
    return frozenset()
