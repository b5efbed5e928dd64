"""Model Breadcrumbs (Davari & Belilovsky, 2023): each task vector loses its largest
(`gamma`) and smallest entries, keeping `density` of them; the kept entries are summed.
Fast path: none yet, the search runs the exact kernel (one sort per task vector and candidate)."""

from evomerge.merge.methods._gta import breadcrumbs_method

METHOD = breadcrumbs_method("breadcrumbs", consensus=False)
