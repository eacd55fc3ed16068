"""Where work runs (design.md, layer `engines`): `local` runs shards of structures in this process, resumably;
a Ray engine reuses its shard store, validation and the schema writer."""
