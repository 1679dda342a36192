"""lossguard's stream side: the Faust app, its sinks and the ``lossguard`` command line.

The Faust app itself lives in :mod:`stream_app.app` and is imported only by the worker, so the CLI,
the broker helpers and the sinks load without starting Faust.
"""
