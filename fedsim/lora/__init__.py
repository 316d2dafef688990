"""Pure tensor helpers shared by strategies."""
