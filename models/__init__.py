"""Models: ViM and PlainMamba with token pruning (filled by a later issue)."""
