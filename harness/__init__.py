"""The harness: experiments, workloads, metrics, results. (Hydra configs land with the harness
issue; until then ``python -m harness`` runs a short demonstration generation.)"""
