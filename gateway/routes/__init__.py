"""HTTP routes, one module per resource; tests mirror them."""
