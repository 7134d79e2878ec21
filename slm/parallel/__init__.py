"""Device meshes and the logical-to-mesh sharding rules."""
