"""One module per annotation source (world, ego4d, coin, segments), plus what they share (common)."""
