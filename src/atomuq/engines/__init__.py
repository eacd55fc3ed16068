"""Where work runs (design.md, layer `engines`): `local` runs shards of structures in this process, resumably;
`ray` (the optional extra atomuq[ray]) runs the same shards on Ray actors, with the local engine's checks, shard
store and schema writer."""
