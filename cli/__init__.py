"""The ``auglocal-fx`` command line (installed as ``auglocal_fx_cli``): thin click wrappers."""
