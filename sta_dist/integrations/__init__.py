"""Client adapters: one package per client, each importing the client's own modules.

- :mod:`sta_dist.integrations.fastvideo`: FastVideo 0.1.7's ``SLIDING_TILE_ATTN`` backend
  served by sta_dist (``install()``, or ``python -m sta_dist.integrations.fastvideo install``).
"""
