"""matplotlib's SVG made fit to sit inside an HTML page, with a tooltip and a link on chosen artists.

The page loads nothing and names no URL: the XML prolog, the DOCTYPE, the metadata and the namespace
declarations go (HTML parsers put an inline ``<svg>`` in the SVG namespace by themselves), and
``xlink:href`` becomes SVG 2's plain ``href``. Several charts share one page, so every id is prefixed
with the chart's name, and so is every reference to one. An artist drawn with an SVG id (``set_gid``)
can get a ``<title>`` (the browser's tooltip), CSS classes, and a link to an anchor of the page.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

_TEXT_TAGS = {"text", "title", "tspan", "desc"}
_DROPPED = {"metadata", "style"}
_URL = re.compile(r"url\(#([^)]+)\)")


@dataclass(frozen=True)
class Mark:
    """What the page adds to one artist, found by its SVG id."""

    title: str
    """The tooltip."""
    css: str
    """Class words (``pt flagged``): the page's style sheet and the tests find the artist by them."""
    href: str | None = None
    """An in-page link (``#L3``): the artist is wrapped in ``<a href>``."""


def inline_svg(svg: bytes, *, name: str, kind: str, label: str, marks: Mapping[str, Mark]) -> str:
    """The ``<svg>`` element of ``svg`` for an HTML page: classes ``chart {kind}``, ``aria-label`` ``label``,
    ids prefixed with ``{name}-`` (unique on the page), ``marks`` applied (keyed by the SVG ids the chart
    gave its artists)."""
    root = ET.fromstring(svg)
    _drop_namespaces(root)
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag in _DROPPED:
                parent.remove(child)
    defined = {el.get("id") for el in root.iter()} - {None}
    for el in root.iter():
        _tidy(el, name, defined)
    _apply_marks(root, name, marks)
    root.attrib.pop("version", None)
    root.set("class", f"chart {kind}")
    root.set("role", "img")
    root.set("aria-label", label)
    return ET.tostring(root, encoding="unicode")


def _drop_namespaces(root: ET.Element) -> None:
    for el in root.iter():
        el.tag = el.tag.rpartition("}")[2]
        for key in [k for k in el.attrib if k.startswith("{")]:
            el.set(key.rpartition("}")[2], el.attrib.pop(key))


def _tidy(el: ET.Element, name: str, defined: set[str | None]) -> None:
    """Prefix the id and the references to ids of this chart; drop layout whitespace; no new windows."""
    if el.tag not in _TEXT_TAGS:
        el.text = None if el.text is None or not el.text.strip() else el.text
    el.tail = None
    el.attrib.pop("target", None)
    for key, value in list(el.attrib.items()):
        if key == "id":
            el.set(key, f"{name}-{value}")
        elif key == "href" and value.startswith("#") and value[1:] in defined:
            el.set(key, f"#{name}-{value[1:]}")
        elif "url(#" in value:
            el.set(key, _URL.sub(lambda m: f"url(#{name}-{m[1]})" if m[1] in defined else m[0], value))
        elif key in ("d", "points"):
            el.set(key, " ".join(value.split()))


def _apply_marks(root: ET.Element, name: str, marks: Mapping[str, Mark]) -> None:
    wanted = {f"{name}-{gid}": mark for gid, mark in marks.items()}
    parents = {child: parent for parent in root.iter() for child in parent}
    for el in list(root.iter()):
        mark = wanted.get(el.get("id") or "")
        if mark is None:
            continue
        title = ET.Element("title")
        title.text = mark.title
        if mark.href is None:
            el.set("class", mark.css)
            el.insert(0, title)
            continue
        parent = parents[el]
        link = ET.Element("a", {"href": mark.href, "class": mark.css})
        link.append(title)
        parent.insert(list(parent).index(el), link)
        parent.remove(el)
        link.append(el)
