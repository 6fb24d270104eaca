"""Packaging options: what the packager is asked to produce (pure data, no libav import).

Every field that changes the produced bytes lives here, so two nodes with the same options and
the same input file produce byte-identical segments and the same media id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ContainerName = Literal["fmp4", "ts"]


@dataclass(frozen=True)
class Rung:
    """One lower rendition of the ABR ladder: output height, quality (CRF), eager or on demand.

    `crf` None means the packager's `crf`. `bframes` caps x264's B-frames (None: the preset's);
    a rung with `bframes = 0` is the one WebRTC viewers get by packet passthrough, and may have
    the top rendition's height.
    """

    height: int
    on_demand: bool = False
    crf: int | None = None
    bframes: int | None = None

    @property
    def rendition_id(self) -> str:
        """The rendition id this rung gets in the manifest (``v720``, or ``v720-nobf``)."""
        return f"v{self.height}" + ("-nobf" if self.bframes == 0 else "")


@dataclass(frozen=True)
class PackagingOptions:
    """How to package one input (see `peerd.config.MediaSettings` for the documented keys)."""

    container: ContainerName = "fmp4"
    segment_seconds: float = 4.0
    transcode: Literal["auto", "always"] = "auto"
    max_height: int | None = None
    crf: int = 23
    audio_bitrate: int = 128_000
    preset: str = "veryfast"
    encoder_threads: int = 4
    ladder: tuple[Rung, ...] = field(default_factory=tuple)
    audio_only: bool = False
