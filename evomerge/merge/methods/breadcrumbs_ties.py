"""Model Breadcrumbs (Davari & Belilovsky, 2023) with TIES' sign election: each task vector loses its largest
(`gamma`) and smallest entries, keeping `density` of them; the kept entries then vote on a sign per entry as in TIES.
Fast path: none yet, the search runs the exact kernel (one sort per task vector and candidate)."""

from evomerge.merge.methods._gta import breadcrumbs_method

METHOD = breadcrumbs_method("breadcrumbs_ties", consensus=True)
