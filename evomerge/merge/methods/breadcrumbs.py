"""Model Breadcrumbs (Davari & Belilovsky, 2023): each task vector loses its largest
(`gamma`) and smallest entries, keeping `density` of them; the kept entries are summed.
The search's path: two cuts of precomputed threshold tables in the shared one-pass kernel (see _gta)."""

from evomerge.merge.methods._gta import breadcrumbs_method

METHOD = breadcrumbs_method("breadcrumbs", consensus=False)
