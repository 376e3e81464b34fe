"""Everything that imports Ray: the cluster, synthesis actors, Ray Train post-training, Tune sweeps.

The rest of the package runs without Ray; these modules put its in-process
stages on a cluster.
"""
