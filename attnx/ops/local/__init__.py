"""Local attention over a token grid: neighbourhood attention (NATTEN) and HaloNet's blocked halo attention."""
