"""The licence of each photo: DEP-5 (machine-readable debian/copyright) and licence READMEs."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dfnet.corpus.archives import RccBundle
from dfnet.corpus.selection import PackageSelection


@dataclass(frozen=True)
class Dep5Stanza:
    """One ``Files:`` paragraph of a machine-readable debian/copyright."""

    patterns: tuple[str, ...]
    licence: str  # the short name: the first line of ``License:``


def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    """Paragraphs of ``Field: value`` lines (continuations indented), field names lower-cased."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, ""
        elif line.startswith("#"):
            continue
        elif line[0] in " \t":
            if last:
                current[last] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            current[last] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def parse_dep5(text: str) -> list[Dep5Stanza] | None:
    """The ``Files:`` stanzas of a machine-readable (DEP-5) copyright file, in file order.

    Returns None when the file is not machine-readable (no ``Format:`` naming the
    copyright-format), so callers fall back to a licence they know from elsewhere.
    """
    paragraphs = _deb822_paragraphs(text)
    if not paragraphs or "copyright-format" not in paragraphs[0].get("format", ""):
        return None
    stanzas = []
    for paragraph in paragraphs[1:]:
        if "files" in paragraph:
            licence = paragraph.get("license", "").split("\n")[0].strip()
            stanzas.append(Dep5Stanza(tuple(paragraph["files"].split()), licence))
    return stanzas


@functools.lru_cache(maxsize=4096)
def _dep5_glob(pattern: str) -> re.Pattern[str]:
    """DEP-5 wildcards: ``*`` is any run of characters (slashes too), ``?`` one character,
    ``\\`` escapes ``*``, ``?`` and itself."""
    pattern = pattern.removeprefix("./")
    parts, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            parts.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        parts.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
        index += 1
    return re.compile("".join(parts), re.DOTALL)


def dep5_licence(stanzas: Sequence[Dep5Stanza], source_path: str) -> str | None:
    """The licence of ``source_path`` (a path in the source tree): the last stanza whose
    ``Files:`` patterns match wins, as the copyright-format specification says."""
    found = None
    for stanza in stanzas:
        if any(_dep5_glob(pattern).fullmatch(source_path) for pattern in stanza.patterns):
            found = stanza.licence or found
    return found


def _normalise_licence(text: str) -> str:
    """``"CC-BY-SA 4.0"`` -> ``"CC-BY-SA-4.0"``, ``"Public Domain"`` -> ``"public-domain"``."""
    name = re.sub(r"\s+", "-", text.strip())
    return "public-domain" if name.lower() == "public-domain" else name


def parse_readme_licences(text: str) -> dict[str, str]:
    """``file -> licence`` from a GCompris-style resource README.

    Those READMEs are paragraphs of ``Copyright:``, ``License:``, ``Source:`` and ``Files:``,
    where the file names follow ``Files:`` on the same line and/or on the lines after it
    (unindented, unlike DEP-5). File names are relative to the README's folder.
    """
    result: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text):
        licence, files, in_files = None, [], False
        for raw in block.splitlines():
            line = raw.strip()
            key = re.match(r"([A-Za-z][A-Za-z-]*):(.*)$", line)
            if key and not re.search(r"\.\w+$", key.group(1)):
                field_name, value = key.group(1).lower(), key.group(2).strip()
                in_files = field_name == "files"
                if field_name == "license":
                    licence = _normalise_licence(value)
                elif in_files and value:
                    files.extend(value.split())
            elif in_files and line:
                files.extend(line.split())
        if licence:
            for name in files:
                result.setdefault(name, licence)
    return result


def rcc_readme_licences(bundle: RccBundle) -> dict[str, str]:
    """``member path -> licence`` from every README inside a bundle."""
    licences: dict[str, str] = {}
    for path, blob in sorted(bundle.files.items()):
        if path.rsplit("/", 1)[-1].upper() in ("README", "README.TXT", "README.MD"):
            folder = path.rsplit("/", 1)[0]
            text = blob.decode("utf-8", errors="replace")
            for name, licence in parse_readme_licences(text).items():
                licences.setdefault(f"{folder}/{name}", licence)
    return licences


def licence_for(
    selection: PackageSelection, path: str, dep5: Sequence[Dep5Stanza] | None, readmes: Mapping[str, str]
) -> str:
    """The recorded licence of one photo: an explicit override, else a README beside it, else
    the DEP-5 stanza of its source path, else the selection's (the documented) licence."""
    overrides = dict(selection.licence_overrides)
    if path in overrides:
        return overrides[path]
    if path in readmes:
        return readmes[path]
    if dep5 is not None and selection.source_root is not None:
        installed, source = selection.source_root
        if path.startswith(installed):
            found = dep5_licence(dep5, source + path[len(installed) :])
            if found:
                return found
    return selection.licence
