"""bt-rm's machinery: one module per concern (README "File map"). Importing it does nothing."""
