"""Which files of which Debian package are photographs: the explicit, per-package selections.

Each :class:`PackageSelection` was judged by eye on contact sheets; :data:`DEFAULT_SELECTIONS`
is the corpus. Globs here never cross a ``/`` (unlike DEP-5's, see :mod:`dfnet.corpus.licences`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PackageSelection:
    """The real photographs of one Debian package, chosen explicitly (judged on contact sheets).

    Patterns are globs on paths inside the package (``usr/share/...``, no leading slash) where
    ``*`` and ``?`` stay within one path segment. When ``members`` is set, ``include`` selects
    Qt ``.rcc`` resource bundles and ``members``/``member_exclude`` select files inside them
    (paths like ``/gcompris/src/...``).
    """

    package: str
    include: tuple[str, ...]
    licence: str  # the licence to record where the copyright files say nothing per file
    exclude: tuple[str, ...] = ()
    #: Stripped from the path (or member path) to name the stored photo: short, stable names.
    name_root: str = ""
    #: ``(installed prefix, source prefix)``: maps a path in the package to the source-tree path
    #: the DEP-5 ``Files:`` patterns are written against. None: do not use the copyright file.
    source_root: tuple[str, str] | None = None
    members: tuple[str, ...] = ()
    member_exclude: tuple[str, ...] = ()
    min_short_side: int = 256
    #: Wallpapers shipped at many resolutions: keep only the largest file of each folder.
    largest_per_folder: bool = False
    #: ``(path, degrees clockwise)`` turns applied after the EXIF orientation, for photos whose
    #: rotation is recorded elsewhere (KPhotoAlbum keeps it in its index.xml, not in EXIF).
    rotations: tuple[tuple[str, int], ...] = ()
    #: ``(path or member path, licence)`` for files the licence sources get wrong or miss.
    licence_overrides: tuple[tuple[str, str], ...] = ()


_PLASMA_WALLPAPERS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
    "Kite", "OneStandsOut", "Path", "summer_1am",
)  # fmt: skip
_LXQT_PHOTOS = (
    "Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png", "beam.png",
    "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg",
)  # fmt: skip
_GCOMPRIS_BUNDLES = (
    "erase", "explore_world_animals", "explore_farm_animals", "explore_monuments", "explore_world_music",
    "clickgame",
)  # fmt: skip
_ENDLESS_SKY = "usr/share/games/endless-sky/plugins/endless-sky-high-dpi/"

#: The corpus: the packages of photo-corpus.md except enlightenment-data (a huge download for a
#: handful of photos) and endless-sky-data (endless-sky-high-dpi holds the same photos, larger).

DEFAULT_SELECTIONS: tuple[PackageSelection, ...] = (
    PackageSelection(
        package="endless-sky-high-dpi",
        include=(_ENDLESS_SKY + "images/land/*.jpg",),
        licence="public-domain / CC-BY-SA-3.0 / CC-BY-SA-4.0 (per file)",
        name_root=_ENDLESS_SKY + "images/land/",
        source_root=(_ENDLESS_SKY, ""),
    ),
    PackageSelection(
        package="forensics-samples-files",
        include=("usr/share/forensics-samples/original-files/pic*/IMG*",),
        licence="CC-BY-SA-4.0",
        name_root="usr/share/forensics-samples/original-files/",
        source_root=("usr/share/forensics-samples/", ""),
    ),
    PackageSelection(
        package="gcompris-qt-data",
        include=tuple(f"usr/share/gcompris-qt/rcc/{name}.rcc" for name in _GCOMPRIS_BUNDLES),
        members=("/gcompris/src/activities/*/resource/*.webp", "/gcompris/src/activities/*/resource/*/*.webp"),
        licence="CC0-1.0 / public-domain / CC-BY / CC-BY-SA-4.0 (per file)",
        name_root="/gcompris/src/activities/",
        # Licences come from the READMEs inside the bundles; debian/copyright is not used: it
        # still lists the .jpg/.png originals, so every .webp would fall to "Files: *" (GPL-3+).
        source_root=None,
        # Its README lists it as "germany/audaPalatina.webp" (a typo): Public Domain.
        licence_overrides=(
            ("/gcompris/src/activities/explore_monuments/resource/germany/aulaPalatina.webp", "public-domain"),
        ),
        min_short_side=300,  # the clickgame fish and other sprites are far smaller
    ),
    PackageSelection(
        package="kphotoalbum",
        include=("usr/share/kphotoalbum/demo/*.jpg",),
        exclude=("usr/share/kphotoalbum/demo/qt-logo.jpg",),
        licence="GPL-2+",
        name_root="usr/share/kphotoalbum/demo/",
        # The demo database's angle="..." attributes (usr/share/kphotoalbum/demo/index.xml).
        rotations=(
            ("usr/share/kphotoalbum/demo/grand_canyon_1.jpg", 180),
            ("usr/share/kphotoalbum/demo/new_wave_1.jpg", 90),
            ("usr/share/kphotoalbum/demo/pool_2.jpg", 270),
            ("usr/share/kphotoalbum/demo/wayne.jpg", 90),
        ),
    ),
    PackageSelection(
        package="lomiri-wallpapers-16.04",
        include=("usr/share/backgrounds/*.jpg",),
        # A texture and a colour gradient, not photographs (checked on the contact sheet).
        exclude=(
            "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",
            "usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg",
        ),
        licence="CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0",
        name_root="usr/share/backgrounds/",
        source_root=("usr/share/backgrounds/", "16.04/"),
    ),
    PackageSelection(
        package="lomiri-wallpapers-20.04",
        include=("usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",),
        licence="CC-BY-SA-3.0",
        name_root="usr/share/backgrounds/",
        source_root=("usr/share/backgrounds/", "20.04/"),
    ),
    PackageSelection(
        package="lxqt-themes",
        include=tuple(f"usr/share/lxqt/wallpapers/{name}" for name in _LXQT_PHOTOS),
        licence="CC-BY-SA-3.0",
        name_root="usr/share/lxqt/wallpapers/",
        source_root=("usr/share/lxqt/", ""),
    ),
    PackageSelection(
        package="palapeli-data",
        include=("usr/share/palapeli/collection/*.jpg",),
        licence="public-domain / GFDL",
        name_root="usr/share/palapeli/collection/",
        source_root=("usr/share/palapeli/collection/", "puzzles/"),
    ),
    PackageSelection(
        package="plasma-workspace-data",
        include=("usr/share/plasma/avatars/photos/*.png",),
        licence="CC0-1.0",
        name_root="usr/share/plasma/avatars/photos/",
        source_root=("usr/share/plasma/avatars/", "kcms/users/avatars/"),
    ),
    PackageSelection(
        package="plasma-workspace-wallpapers",
        include=tuple(f"usr/share/wallpapers/{name}/contents/images/*" for name in _PLASMA_WALLPAPERS),
        licence="LGPL-3",  # metadata.json of each wallpaper; debian/copyright says GPL-2+ for all
        name_root="usr/share/wallpapers/",
        source_root=("usr/share/wallpapers/", ""),
        largest_per_folder=True,
    ),
    PackageSelection(
        package="sddm-theme-maldives",
        include=("usr/share/sddm/themes/maldives/background.jpg",),
        licence="CC-BY-3.0",
        name_root="usr/share/sddm/themes/",
        source_root=("usr/share/sddm/themes/", "data/themes/"),
    ),
    PackageSelection(
        package="tuxpaint-data",
        include=("usr/share/tuxpaint/templates/*.jpg",),
        licence="GPL-2+",
        name_root="usr/share/tuxpaint/templates/",
        source_root=("usr/share/tuxpaint/", ""),
    ),
)


@functools.lru_cache(maxsize=512)
def _segment_glob(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a path glob whose ``*`` and ``?`` never cross a ``/``."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts))


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(_segment_glob(pattern).fullmatch(path) for pattern in patterns)


def photo_name(path: str, root: str) -> str:
    """A stable file name from a path inside the package: root and extension dropped, folders
    joined with ``_``, and only ``[A-Za-z0-9._-]`` kept."""
    relative = path[len(root) :] if root and path.startswith(root) else path
    stem, dot, suffix = relative.rpartition(".")
    if dot and "/" not in suffix:
        relative = stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", relative.strip("/").replace("/", "_"))
    return name.strip("._") or "photo"
