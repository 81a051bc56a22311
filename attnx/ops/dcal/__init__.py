"""DCAL family: global-local (GLCA) and pair-wise (PWCA) cross attention, and the attention rollout that ranks GLCA's
local queries."""
