"""The demo page: ``python -m demo`` (started by ``python cluster.py``).  For a local try-out only:
it hands a token to anyone who asks for a user name.  See ``demo.app``."""
