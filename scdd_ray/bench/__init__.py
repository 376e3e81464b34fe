"""`scdd-ray bench`: production code paths timed (`recover`, `scaling`), and methods ranked (`models`, `table`).

One module per subcommand; each builds its cells' configurations through
scdd_ray.config and asks scdd_ray.backbones for their models, as `distill` does.
"""
