"""The offline photo corpus: real photographs taken out of Debian packages, nothing installed.

The bundled sample photos (about fifteen) are too few to teach inpainting; Debian's archive holds
several hundred real photographs in packages of wallpapers, game art and demo data (see
``/work/shared/docs/photo-corpus.md``). The corpus is built in four steps, a module each:

- :mod:`~dfnet.corpus.selection`: which files of which package are photos
  (:data:`DEFAULT_SELECTIONS`, checked by eye on contact sheets);
- :mod:`~dfnet.corpus.archives`: ``apt-get download``, ``dpkg-deb`` and Qt ``.rcc`` bundles;
- :mod:`~dfnet.corpus.licences`: each photo's licence from DEP-5 copyright files and READMEs;
- :mod:`~dfnet.corpus.photos` and :mod:`~dfnet.corpus.build`: decode, de-duplicate and store
  ``{out_dir}/photos/{package}/{name}.jpg`` with a manifest row naming package, path and licence.
  Without apt it falls back, with one warning, to the sample photos of scikit-image/scikit-learn.

Plain Python, Pillow and numpy (no Ray, no MLflow): ``pipelines/corpus.py`` is the DVC stage
around :func:`build_corpus`. Same inputs give the same files and manifest: packages, files and
duplicates are visited in sorted order, and JPEG encoding is deterministic for a Pillow build.
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
