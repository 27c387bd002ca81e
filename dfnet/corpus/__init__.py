"""The offline photo corpus: real photographs taken out of Debian packages, nothing installed.

The bundled sample photos are too few to teach inpainting; Debian's wallpaper, game-art and demo
packages hold many real photographs (``/work/shared/docs/photo-corpus.md``). One module per step:
:mod:`~dfnet.corpus.selection` (which files are photos), :mod:`~dfnet.corpus.archives`
(download and unpack), :mod:`~dfnet.corpus.licences`, and :mod:`~dfnet.corpus.photos` with
:mod:`~dfnet.corpus.build` (decode, de-duplicate, store with a manifest). Without apt it falls
back to the sample photos. Everything is visited in sorted order, so the output is repeatable.
"""

from dfnet.corpus.archives import (
    DownloadResult,
    RccBundle,
    apt_available,
    deb_field,
    download_packages,
    find_deb,
    read_rcc,
)
from dfnet.corpus.build import (
    MANIFEST_COLUMNS,
    build_corpus,
    build_sample_corpus,
    contact_sheet,
    manifest_rows,
    write_corpus,
    write_manifest,
)
from dfnet.corpus.licences import Dep5Stanza, dep5_licence, parse_dep5, parse_readme_licences
from dfnet.corpus.photos import SKIP_REASONS, Candidate, PackageHarvest, deduplicate, harvest_package
from dfnet.corpus.selection import DEFAULT_SELECTIONS, PackageSelection

__all__ = [
    "DEFAULT_SELECTIONS",
    "MANIFEST_COLUMNS",
    "SKIP_REASONS",
    "Candidate",
    "Dep5Stanza",
    "DownloadResult",
    "PackageHarvest",
    "PackageSelection",
    "RccBundle",
    "apt_available",
    "build_corpus",
    "build_sample_corpus",
    "contact_sheet",
    "deb_field",
    "deduplicate",
    "dep5_licence",
    "download_packages",
    "find_deb",
    "harvest_package",
    "manifest_rows",
    "parse_dep5",
    "parse_readme_licences",
    "read_rcc",
    "write_corpus",
    "write_manifest",
]
