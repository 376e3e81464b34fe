"""Models: architectures (resnet), building them by name (factory), running them (runtime), our checkpoint
format (checkpoint), public checkpoints (public), input renormalisation (adapt). Import from those modules."""
