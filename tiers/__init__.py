"""Storage tiers, one module per medium. Imported lazily through :mod:`kvbm_fs.registry`."""
