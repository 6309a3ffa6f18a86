"""Data preparation: the seed's manifests (Alpaca, LibriSpeech, GigaSpeech, Common Voice) and the
offline preprocessing of stage-2 data into parquet shards, as Ray Data jobs.

Every job counts what it keeps and what it drops (by reason), writes its outputs atomically and
writes a ``_summary.json``-style record next to them; a rerun skips finished work.
"""

from blsp_ray.data.common import DropReason, Summary

__all__ = ["DropReason", "Summary"]
