"""Codecs: the codec interface, the registry behind ``--codec NAME``, rate control, the
bitstream container and quality metrics. Nothing here knows about Ray or storage."""

from ratefit.codecs.base import Codec, ControlRange, CodecError
from ratefit.codecs.registry import get_codec, list_codecs, register

__all__ = ["Codec", "ControlRange", "CodecError", "get_codec", "list_codecs", "register"]
