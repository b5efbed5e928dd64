"""Model Breadcrumbs (Davari & Belilovsky, 2023) with TIES' sign election: each task vector loses its largest
(`gamma`) and smallest entries, keeping `density` of them; the kept entries then vote on a sign per entry as in TIES.
The search's path: two cuts of precomputed threshold tables in the shared one-pass kernel (see _gta)."""

from evomerge.merge.methods._gta import breadcrumbs_method

METHOD = breadcrumbs_method("breadcrumbs_ties", consensus=True)
