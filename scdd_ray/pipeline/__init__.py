"""The commands' work, one module each: distill (prepare then run), post-train, squeeze,
BN inspection; plus the backbones they share. Every check that can fail on input
happens before anything is written."""
