"""A codec from another package, found through the ``ratefit.codecs`` entry point group.

The plugin here is a real distribution on ``sys.path`` (a module plus its ``.dist-info``
with ``entry_points.txt``), which is exactly what ``pip install`` leaves behind, so
``importlib.metadata`` finds it the way it finds an installed one. It is the README's
minimal example, so the documentation is checked too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ratefit.codecs import registry
from ratefit.codecs.rate import Target, search

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block(marker: str) -> str:
    """The fenced block in the README that follows the line containing ``marker``."""
    text = README.read_text()
    at = text.index(marker)
    return re.search(r"```[a-z]*\n(.*?)```", text[at:], re.S).group(1)


@pytest.fixture()
def installed_plugin(tmp_path, monkeypatch):
    (tmp_path / "ratefit_png8.py").write_text(_readme_block("ratefit_png8.py"))
    info = tmp_path / "ratefit_png8-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ratefit-png8\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(_readme_block("entry_points.txt"))
    registry.list_codecs()   # the built-ins register on their first import, once per process
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    yield
    sys.modules.pop("ratefit_png8", None)


def test_a_plugin_codec_is_listed_built_and_usable(installed_plugin, samples_dir):
    from PIL import Image

    from ratefit.codecs import container

    assert "png8" in registry.list_codecs()
    codec = registry.get_codec("png8")
    assert codec.control.discrete and codec.extension == "png8.rfic"
    img = np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB"))
    outcome = search(codec, codec.prepare(img), img, Target("bpp", 3.0), container.header_size("png8"))
    assert outcome.status == "ok" and len(outcome.payload) * 8 / (img.shape[0] * img.shape[1]) <= 3.0
    back = codec.decode(outcome.payload, img.shape[1], img.shape[0], outcome.value)
    assert back.shape == img.shape and back.dtype == np.uint8


def test_builtin_names_win_over_a_plugin_of_the_same_name(installed_plugin, tmp_path):
    info = next(tmp_path.glob("*.dist-info"))
    (info / "entry_points.txt").write_text("[ratefit.codecs]\njpeg = ratefit_png8:png8\n")
    assert registry.get_codec("jpeg").name == "jpeg"
