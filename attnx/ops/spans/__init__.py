"""MoA sink + per-head window spans and ACT attention calibration (registry entries `moa_span`, `act`)."""
