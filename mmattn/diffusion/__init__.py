"""diffusers integration (BroadWay, AttenCraft)."""
