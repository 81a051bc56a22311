"""Grain input pipelines. `sources` finds text files; `byte_lm` turns them into shuffled byte windows."""
