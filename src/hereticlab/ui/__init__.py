"""Layer 6, what a person sees in a notebook: plots and animations of residual geometry, the geometry explorer
widget, the side-by-side chat comparison and the Pareto trial picker. Imported on demand (matplotlib, ipywidgets)."""
