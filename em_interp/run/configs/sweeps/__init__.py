"""Example sweep files (TOML) for ``em-interp sweep``; see :mod:`em_interp.run.sweep.spec`."""
