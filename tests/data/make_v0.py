"""Write tests/data/*_v0.extxyz with the code as it was before the output schema (commit dcdf378)."""
import numpy as np
from atomuq.core.io import read_structures, write_structures
from atomuq.models.registry import resolve_model
from atomuq.models.checkpoint import weights_fingerprint
from atomuq.uq.ltau.estimator import fit_estimator
from atomuq.uq.ltau.index import build_index
from atomuq.workflows.ltau import compute_descriptors, predict_records, annotate
from atomuq.workflows.attack import attack, AttackSettings

model = resolve_model(None)
records = read_structures(["/tmp/schema_v0/in3.extxyz"])
desc = compute_descriptors(model, [r.atoms for r in records])
rng = np.random.default_rng(0)
n = len(desc)
runs = [rng.lognormal(-3, 0.5, (5, n)) for _ in range(2)]
numbers = np.concatenate([r.atoms.numbers for r in records])
est = fit_estimator(runs, numbers, np.abs(rng.normal(size=n)), build_index(desc), atol=0.05,
                    metadata={"model_fingerprint": weights_fingerprint(model), "model": "molecular-small"})
scored = predict_records(records, model, est, k=2)
atoms, _ = annotate(records, scored, "direct")
write_structures("tests/data/ltau_scored_v0.extxyz", atoms)
res = attack(model, [records[0].atoms], AttackSettings(steps=2, seed=0))
write_structures("tests/data/attack_v0.extxyz", res.to_atoms([records[0].atoms], [records[0].source]))
