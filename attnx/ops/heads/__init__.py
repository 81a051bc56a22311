"""Head-level mechanisms: gates and routers that act on whole heads around any attention core (MoH)."""
