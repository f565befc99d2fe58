"""Example run configs (TOML) for ``em-interp run``; see :mod:`em_interp.run.config`."""
