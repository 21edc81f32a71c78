"""The command layer: `anymodal ...` handlers over the typed functions below them. Nothing imports it."""
