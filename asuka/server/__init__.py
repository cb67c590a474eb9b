"""``asuka serve``: the web UI and REST API (see :mod:`asuka.server.app`)."""
